"""eSpeak NG through ctypes: the shared library and voice data shipped in the espeakng-loader wheel.

No system eSpeak and no subprocess: ``Engine`` loads ``libespeak-ng.so`` from the wheel into the
calling process and synthesises 22050 Hz int16 audio through the synchronous callback API.

A speaker is a ``SpeakerSpec``: an English dialect voice (``list_voices()``), a voice variant
(``list_variants()``, the files of ``espeak-ng-data/voices/!v``), a rate and a pitch.

Determinism: eSpeak keeps state between utterances (static state of its wave generator, such
as phase and echo buffer) that neither a voice reload nor ``espeak_Terminate`` +
``espeak_Initialize`` resets: the same text with the same seed twice in one process gives
different samples, even different lengths. A fresh process that makes the same calls in the
same order gives identical samples. So one process synthesises one
fixed list of utterances (a shard, see ``synth.py``) and, per utterance, reloads the voice,
sets every parameter and seeds both generators the library draws from: its own
(``espeak_ng_SetRandSeed``, breath noise) and libc's ``rand()`` (which the library imports).
"""

from __future__ import annotations

import ctypes
import difflib
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchestrator.data.errors import CorpusError

# Public API constants of speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_INITIALIZE_DONT_EXIT = 0x8000
_RATE, _VOLUME, _PITCH, _RANGE, _PUNCTUATION, _CAPITALS, _WORDGAP = 1, 2, 3, 4, 5, 6, 7
_EE_OK = 0

RATE_RANGE = (80, 450)  # words per minute, espeakRATE_MINIMUM .. espeakRATE_MAXIMUM
PITCH_RANGE = (0, 100)

# Voices that read Latin-script English text. en-Shaw expects the Shavian alphabet.
_EXCLUDED_VOICES = {"en-shaw"}

# Variants that sound like a person reading: the robots, whispers, heavy echoes, extreme
# pitches and the speed-test variant of the shipped folder are left out. Klatt-synthesised
# variants (klatt*, adam, benjamin, david, edward, Reed) add a second synthesiser's timbre.
DEFAULT_VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8",
    "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3", "adam", "benjamin", "david", "edward", "Reed",
    "Gene", "Jacky", "Michael", "Mike", "Storm", "Denis", "ed", "gustave", "ian", "iven3",
    "john", "marcelo", "max", "norbert", "paul", "quincy", "rob", "robert", "travis", "victor",
    "grandpa", "linda", "belinda", "steph", "steph3", "grandma", "Annie", "aunty", "shelby",
)


def library_path() -> Path:
    """The eSpeak NG shared library inside the espeakng-loader wheel."""
    import espeakng_loader

    return Path(espeakng_loader.get_library_path())


def data_path() -> Path:
    """The wheel's ``espeak-ng-data`` folder (phoneme tables, dictionaries, voices)."""
    import espeakng_loader

    return Path(espeakng_loader.get_data_path())


class _Voice(ctypes.Structure):
    # espeak_VOICE of speak_lib.h
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_void_p),  # (priority byte, NUL-terminated code)*, then a 0 byte
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


def _load() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(library_path()))
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_ng_InitializePath.argtypes = [ctypes.c_char_p]
    lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
    lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
    lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_ng_SetRandSeed.restype = ctypes.c_int
    lib.espeak_Synth.argtypes = [
        ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
        ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
    ]
    lib.espeak_Info.argtypes = [ctypes.c_void_p]
    lib.espeak_Info.restype = ctypes.c_char_p
    return lib


@functools.cache
def _listing_lib() -> ctypes.CDLL:
    """The library with only its data path set: enough to list voices, no synthesis state."""
    lib = _load()
    lib.espeak_ng_InitializePath(str(data_path()).encode())
    return lib


def espeak_version() -> str:
    """The library's version string, e.g. ``'1.52.0'``."""
    return _listing_lib().espeak_Info(None).decode()


@functools.cache
def list_voices() -> tuple[str, ...]:
    """English dialect voices of the shipped data, by the names ``SpeakerSpec.voice`` takes.

    Enumerated with ``espeak_ListVoices``; a name is the lower-cased file name of the voice
    (``gmw/en-GB-x-rp`` -> ``en-gb-x-rp``), which ``espeak_SetVoiceByName`` resolves.
    """
    voices = _listing_lib().espeak_ListVoices(None)
    names = []
    i = 0
    while voices[i]:
        voice = voices[i].contents
        name = voice.identifier.decode().rsplit("/", 1)[-1].lower()
        if (name == "en" or name.startswith("en-")) and name not in _EXCLUDED_VOICES:
            names.append(name)
        i += 1
    return tuple(sorted(set(names)))


@functools.cache
def list_variants() -> tuple[str, ...]:
    """Every voice variant the shipped data holds (the file names of ``voices/!v``).

    eSpeak silently ignores an unknown ``+variant``, so names are checked against this list.
    """
    folder = data_path() / "voices" / "!v"
    return tuple(sorted(p.name for p in folder.iterdir() if p.is_file() and " " not in p.name))


@functools.cache
def variant_sex(variant: str) -> str:
    """'M' or 'F' for SPEAKERS.TXT: the variant's ``gender`` line, else its base pitch.

    eSpeak's default voice is male (base pitch 82 Hz); a variant without a gender line whose
    base pitch is 140 Hz or more sounds female.
    """
    pitch = None
    for line in (data_path() / "voices" / "!v" / variant).read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].lower() == "gender":
            if parts[1].lower() in ("male", "female"):
                return parts[1][0].upper()
        if len(parts) >= 2 and parts[0].lower() == "pitch" and parts[1].isdigit():
            pitch = int(parts[1])
    return "F" if pitch is not None and pitch >= 140 else "M"


def _check_name(name: str, known: tuple[str, ...], what: str, choices: str) -> str:
    """``name`` if ``known`` holds it, else a :class:`CorpusError` with close matches and ``choices``."""
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise CorpusError(f"unknown {what} {name!r}{hint}: {choices}")
    return name


def check_voice(name: str) -> str:
    """``name`` if it is a known English voice, else a :class:`CorpusError` listing the known ones."""
    known = list_voices()
    return _check_name(name, known, "eSpeak voice", f"choose from {', '.join(known)}")


def check_variant(name: str) -> str:
    """``name`` if the shipped ``voices/!v`` folder holds it, else a :class:`CorpusError`."""
    return _check_name(
        name, list_variants(), "eSpeak voice variant",
        f"choose one of the files in {data_path() / 'voices' / '!v'}, "
        f"e.g. {', '.join(DEFAULT_VARIANTS[:6])}",
    )


@dataclass(frozen=True, kw_only=True)
class SpeakerSpec:
    """A synthetic speaker: one fixed eSpeak configuration.

    Attributes:
        voice: English dialect voice, one of ``list_voices()`` (e.g. ``"en-gb-scotland"``).
        variant: voice variant, one of ``list_variants()`` (e.g. ``"m3"``, ``"f2"``).
        rate: speaking rate in words per minute (80 to 450; eSpeak's default is 175).
        pitch: base pitch, 0 to 100 (eSpeak's default is 50).
    """

    voice: str
    variant: str
    rate: int
    pitch: int

    def validate(self) -> "SpeakerSpec":
        """Raise ValueError naming the bad field; return self."""
        check_voice(self.voice)
        check_variant(self.variant)
        if not RATE_RANGE[0] <= self.rate <= RATE_RANGE[1]:
            raise ValueError(f"speaker rate {self.rate} is outside eSpeak's {RATE_RANGE} wpm")
        if not PITCH_RANGE[0] <= self.pitch <= PITCH_RANGE[1]:
            raise ValueError(f"speaker pitch {self.pitch} is outside eSpeak's {PITCH_RANGE}")
        return self

    @property
    def espeak_name(self) -> str:
        """The name ``espeak_SetVoiceByName`` takes: ``voice+variant``."""
        return f"{self.voice}+{self.variant}"


_engine_loaded = False


class Engine:
    """eSpeak NG loaded into this process, synthesising one utterance per call.

    Only one Engine may exist per process (the library's state is global): create it in a
    fresh worker process, see the module docstring.
    """

    def __init__(self) -> None:
        global _engine_loaded
        if _engine_loaded:
            raise RuntimeError("eSpeak NG is already loaded in this process: use one Engine")
        _engine_loaded = True
        self._lib = _load()
        self.sample_rate = self._lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 500, str(data_path()).encode(), _INITIALIZE_DONT_EXIT
        )
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed with data at {data_path()}")
        self._libc = ctypes.CDLL(None)
        self._chunks: list[np.ndarray] = []
        self._callback = _SynthCallback(self._on_audio)  # kept alive: the library holds it
        self._lib.espeak_SetSynthCallback(self._callback)

    def _on_audio(self, wav, num_samples, events) -> int:
        if wav and num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, (num_samples,)).copy())
        return 0  # 0 = continue synthesis

    def synthesize(self, text: str, speaker: SpeakerSpec, *, seed: int) -> np.ndarray:
        """Speak ``text`` with ``speaker``.

        Args:
            text: what to read (lower case; eSpeak spells out all-caps words).
            speaker: a validated ``SpeakerSpec``.
            seed: seeds eSpeak's and libc's random generators for this utterance.

        Returns:
            int16 samples at ``self.sample_rate`` (22050 Hz), shape ``(samples,)``.
        """
        lib = self._lib
        status = lib.espeak_SetVoiceByName(speaker.espeak_name.encode())
        if status != _EE_OK:
            raise RuntimeError(
                f"eSpeak cannot load voice {speaker.espeak_name!r} (status {status})")
        for param, value in ((_RATE, speaker.rate), (_VOLUME, 100), (_PITCH, speaker.pitch),
                             (_RANGE, 50), (_PUNCTUATION, 0), (_CAPITALS, 0), (_WORDGAP, 0)):
            lib.espeak_SetParameter(param, value, 0)
        lib.espeak_ng_SetRandSeed(seed)
        self._libc.srand(ctypes.c_uint(seed & 0xFFFFFFFF))
        self._chunks = []
        data = text.encode("utf-8")
        status = lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8,
                                  None, None)
        if status != _EE_OK:
            raise RuntimeError(f"espeak_Synth failed (status {status}) on {text!r}")
        if not self._chunks:
            return np.zeros(0, dtype=np.int16)
        return np.concatenate(self._chunks)
