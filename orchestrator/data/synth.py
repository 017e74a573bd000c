"""Generated speech corpus in LibriSpeech's exact layout, spoken by eSpeak NG.

Usage:
    # the default corpus (about 3 h of train-clean-100, 200 utterances per dev/test subset)
    python -m orchestrator.data.synth --out data/synth
    # a tiny one, another seed
    python -m orchestrator.data.synth --out /tmp/synth-tiny --seed 1 \
        --train 12 --dev 4 --test 4 --test-other 0
    # what the speakers can be made of
    python -m orchestrator.data.synth --list-voices
    # a subset of dialects and variants, 2 worker processes
    python -m orchestrator.data.synth --out data/synth-us \
        --voices en-us,en-us-nyc --variants m1,m3,f2,f4 --workers 2

Layout (as LibriSpeech; 16 kHz mono 16-bit FLAC):
    <out>/corpus.json                        seed, sizes, voices, speakers, generator version
    <out>/SPEAKERS.TXT                       LibriSpeech-style speaker table
    <out>/<subset>/<spk>/<chap>/<spk>-<chap>-<utt>.flac
    <out>/<subset>/<spk>/<chap>/<spk>-<chap>.trans.txt   lines '<spk>-<chap>-<utt> TRANSCRIPT'
    <out>/.synth/done/<subset>/<spk>.json                per-speaker done markers (resume)

Subsets: train-clean-100, dev-clean, test-clean, test-other. Speakers are held out: a speaker
is a fixed (voice, variant, rate, pitch) combination and no combination, and no speaker id,
appears in two subsets. Train, dev-clean and test-clean speakers share one pool (rates 140-200
wpm, pitches 35-65); test-other speakers are harder (rates 205-250 wpm, pitches at the
extremes, a higher noise floor). Dev and test sentences never occur in train (nor anywhere
else in the corpus: every transcript is unique).

Python API: ``generate_corpus(out, seed=0, sizes={...}, workers=2) -> summary dict``,
``plan_corpus(...)`` (everything but the audio), ``list_voices()``, ``list_variants()``.

Determinism: the same seed and sizes give byte-identical audio, whatever ``--workers``, with
the same library versions (eSpeak NG data, torch's float kernels, libFLAC). The
plan (speakers, chapters, sentences, per-utterance seeds) is drawn in the parent from
string-seeded ``random.Random`` generators. Each shard (one speaker, all its chapters) is
synthesised in a fresh process (``forkserver`` start method, one task per process), because
eSpeak keeps state between utterances that cannot be reset (see ``espeak.py``): a fresh
process making the same calls in the same order gives the same samples. Per utterance the
voice is reloaded, every parameter set, and eSpeak's and libc's generators seeded.

Resume: every file is written under a temporary name and renamed. A shard's done marker is
written last; a rerun with the same arguments skips shards whose marker and files exist and
redoes the rest. A folder that holds another corpus (other seed, sizes, voices or variants),
or anything that is not a generated corpus, is refused.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import multiprocessing
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from orchestrator.data import espeak
from orchestrator.data.espeak import SpeakerSpec, list_variants, list_voices
from orchestrator.data.grammar import TRANSCRIPT_RE, Grammar, Sentence, vocabulary

__all__ = ["SUBSETS", "generate_corpus", "list_voices", "list_variants", "plan_corpus", "main"]

GENERATOR_VERSION = 1
SAMPLE_RATE = 16000
METADATA = "corpus.json"
STATE_DIR = ".synth"
# Target utterance length (seconds, silence padding included); the sentence whose estimated
# duration is nearest a uniform draw in this range is kept.
TARGET_SECONDS = (1.8, 5.3)
ALLOWED_ESTIMATE = (1.7, 5.5)
PAD_SECONDS = (0.05, 0.25)  # leading and trailing silence, each
LEVEL_DBFS = (-30.0, -18.0)  # speech RMS level


@dataclass(frozen=True)
class Subset:
    """How one subset is made.

    Attributes:
        name: LibriSpeech subset name (also the folder name).
        flag: the CLI option that sizes it.
        default_size: utterances by default.
        per_speaker: utterances per speaker (the number of speakers follows from the size).
        rates: speaking rates (wpm) its speakers are drawn from.
        pitches: base pitches its speakers are drawn from.
        noise_dbfs: range of the white-noise floor level (dB full scale RMS).
    """

    name: str
    flag: str
    default_size: int
    per_speaker: int
    rates: tuple[int, ...]
    pitches: tuple[int, ...]
    noise_dbfs: tuple[float, float]


_CLEAN_RATES = tuple(range(140, 201, 5))
_CLEAN_PITCHES = tuple(range(35, 66, 5))
_OTHER_RATES = tuple(range(205, 251, 5))
_OTHER_PITCHES = (15, 20, 25, 30, 70, 75, 80, 85)
SUBSETS = (
    Subset("train-clean-100", "--train", 3000, 30, _CLEAN_RATES, _CLEAN_PITCHES, (-70, -55)),
    Subset("dev-clean", "--dev", 200, 20, _CLEAN_RATES, _CLEAN_PITCHES, (-70, -55)),
    Subset("test-clean", "--test", 200, 20, _CLEAN_RATES, _CLEAN_PITCHES, (-70, -55)),
    Subset("test-other", "--test-other", 200, 20, _OTHER_RATES, _OTHER_PITCHES, (-50, -40)),
)
_SUBSET = {s.name: s for s in SUBSETS}


# --- plan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class UtterancePlan:
    """One utterance: its id, transcript, the text eSpeak reads and its synthesis seed."""

    id: str
    transcript: str
    spoken: str
    seed: int


@dataclass(frozen=True)
class Chapter:
    """One chapter: a folder of utterances with one transcript file."""

    id: int
    utterances: tuple[UtterancePlan, ...]


@dataclass(frozen=True)
class Shard:
    """One speaker (its chapters): the unit of work, of resumption and of a fresh process."""

    subset: str
    speaker_id: int
    speaker: SpeakerSpec
    chapters: tuple[Chapter, ...]
    noise_dbfs: tuple[float, float]

    @property
    def utterances(self) -> tuple[UtterancePlan, ...]:
        return tuple(u for c in self.chapters for u in c.utterances)

    def chapter_dir(self, out: Path, chapter: Chapter) -> Path:
        return out / self.subset / str(self.speaker_id) / str(chapter.id)

    def transcript_path(self, out: Path, chapter: Chapter) -> Path:
        return self.chapter_dir(out, chapter) / f"{self.speaker_id}-{chapter.id}.trans.txt"

    def marker(self, out: Path) -> Path:
        return out / STATE_DIR / "done" / self.subset / f"{self.speaker_id}.json"


def estimate_seconds(transcript: str, rate: int) -> float:
    """Expected length of the rendered utterance (speech plus padding) in seconds.

    Fitted on eSpeak NG 1.52 over all default voices and variants (relative error sd ~8%).
    """
    speech = 0.19 + 0.0478 * len(transcript) * 175.0 / rate
    return speech + sum(PAD_SECONDS)


def _utterance_seed(seed: int, utt_id: str) -> int:
    digest = hashlib.sha256(f"synth-v{GENERATOR_VERSION}/{seed}/{utt_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _rng(seed: int, *names: str) -> random.Random:
    # str seeds are hashed with SHA-512 by random.seed: stable across runs and platforms.
    return random.Random("/".join([f"synth-v{GENERATOR_VERSION}", str(seed), *names]))


def _join(first: Sentence, second: Sentence, rng: random.Random) -> Sentence:
    connector = rng.choice(["and", "but", "so", "then", "and then", "while"])
    return Sentence(words=first.words + tuple(connector.split()) + second.words,
                    question=second.question)


def _pick_sentence(grammar: Grammar, rng: random.Random, rate: int, used: set[str]) -> Sentence:
    """A new sentence whose estimated length is near a random target for this speaker's rate."""
    target = rng.uniform(*TARGET_SECONDS)
    best, best_err = None, math.inf
    for _ in range(24):
        sentence = grammar.sentence()
        while (not sentence.question and estimate_seconds(sentence.transcript, rate) < target - 0.8
               and len(sentence.words) < 28):
            sentence = _join(sentence, grammar.sentence(), rng)
        est = estimate_seconds(sentence.transcript, rate)
        if sentence.transcript in used or not ALLOWED_ESTIMATE[0] <= est <= ALLOWED_ESTIMATE[1]:
            continue
        if abs(est - target) < best_err:
            best, best_err = sentence, abs(est - target)
        if best_err < 0.3:
            break
    if best is None:
        raise RuntimeError(f"the grammar gave no new sentence of {target:.1f} s at {rate} wpm")
    return best


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def plan_corpus(*, seed: int, sizes: Mapping[str, int], voices: Sequence[str],
                variants: Sequence[str]) -> list[Shard]:
    """Draw speakers, chapters and sentences: the whole corpus but its audio.

    Args:
        seed: corpus seed.
        sizes: utterances per subset name (see ``SUBSETS``); 0 leaves a subset out.
        voices: validated English voices speakers are drawn from.
        variants: validated voice variants speakers are drawn from.

    Returns:
        One shard per speaker, in a fixed order (subsets as in ``SUBSETS``, then speakers).
    """
    rng = _rng(seed, "speakers")
    active = [s for s in SUBSETS if sizes.get(s.name, 0) > 0]
    counts = {s.name: min(sizes[s.name], math.ceil(sizes[s.name] / s.per_speaker)) for s in active}

    # Speakers: distinct (voice, variant, rate, pitch) combinations, none shared by two subsets.
    specs: dict[str, list[SpeakerSpec]] = {}
    taken: set[SpeakerSpec] = set()
    for subset in active:
        pool = (len(voices), len(variants), len(subset.rates), len(subset.pitches))
        pool_size = math.prod(pool)
        free = pool_size - sum(1 for t in taken if t.rate in subset.rates
                               and t.pitch in subset.pitches)
        if counts[subset.name] > free:
            raise ValueError(
                f"{subset.name} needs {counts[subset.name]} distinct speakers but the "
                f"{len(voices)} voices x {len(variants)} variants allow {free} more: "
                f"add voices or variants, or lower {subset.flag}"
            )
        chosen: list[SpeakerSpec] = []
        while len(chosen) < counts[subset.name]:
            index = rng.randrange(pool_size)
            i_voice, rest = divmod(index, pool[1] * pool[2] * pool[3])
            i_variant, rest = divmod(rest, pool[2] * pool[3])
            i_rate, i_pitch = divmod(rest, pool[3])
            spec = SpeakerSpec(voice=voices[i_voice], variant=variants[i_variant],
                               rate=subset.rates[i_rate], pitch=subset.pitches[i_pitch])
            if spec not in taken:
                taken.add(spec)
                chosen.append(spec)
        specs[subset.name] = chosen

    n_speakers = sum(counts.values())
    # LibriSpeech's speaker ids have 2 to 4 digits; very large corpora get 5.
    speaker_ids = rng.sample(range(10, 10000 if n_speakers <= 5000 else 100000), n_speakers)
    # Chapters: one or two per speaker (speakers with few utterances read one).
    layout: list[tuple[Subset, SpeakerSpec, int, list[int]]] = []
    for subset in active:
        per_speaker = _split(sizes[subset.name], counts[subset.name])
        for spec, n_utts in zip(specs[subset.name], per_speaker):
            n_chapters = 1 if n_utts < 16 else rng.choice((1, 2))
            layout.append((subset, spec, speaker_ids[len(layout)], _split(n_utts, n_chapters)))
    chapter_ids = iter(rng.sample(range(100, 300000), sum(len(c) for *_, c in layout)))

    grammar_rngs = {s.name: _rng(seed, s.name, "text") for s in active}
    grammars = {name: Grammar(r) for name, r in grammar_rngs.items()}
    used: set[str] = set()  # transcripts so far: train first, so dev/test never repeat train
    shards = []
    for subset, spec, speaker_id, chapter_sizes in layout:
        chapters = []
        for n_utts in chapter_sizes:
            chapter_id = next(chapter_ids)
            utts = []
            for i in range(n_utts):
                sentence = _pick_sentence(grammars[subset.name], grammar_rngs[subset.name],
                                          spec.rate, used)
                if not TRANSCRIPT_RE.match(sentence.transcript):
                    raise RuntimeError(f"grammar bug: {sentence.transcript!r} is not in "
                                       "LibriSpeech's alphabet")
                used.add(sentence.transcript)
                utt_id = f"{speaker_id}-{chapter_id}-{i:04d}"
                utts.append(UtterancePlan(id=utt_id, transcript=sentence.transcript,
                                          spoken=sentence.spoken,
                                          seed=_utterance_seed(seed, utt_id)))
            chapters.append(Chapter(id=chapter_id, utterances=tuple(utts)))
        shards.append(Shard(subset=subset.name, speaker_id=speaker_id, speaker=spec,
                            chapters=tuple(chapters), noise_dbfs=subset.noise_dbfs))
    return shards


# --- files --------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    _write_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


@functools.cache
def _resampler(orig_rate: int):
    """torchaudio's sinc resampler to 16 kHz with its kernel built once per process.

    ``transforms.Resample`` runs ``torchaudio.functional.resample``'s algorithm; building the
    441 x 320 phase kernel on every call would cost twice the filtering itself.
    """
    import torchaudio

    return torchaudio.transforms.Resample(orig_rate, SAMPLE_RATE)


def _render(raw: np.ndarray, sample_rate: int, seed: int,
            noise_dbfs: tuple[float, float]) -> np.ndarray:
    """eSpeak's int16 samples -> 16 kHz int16 with a level, silence padding and a noise floor.

    Runs single-threaded, so the float arithmetic (hence the output) is reproducible.
    """
    import torch

    if raw.size == 0:
        raise RuntimeError("eSpeak returned no audio")
    rng = np.random.default_rng(seed)
    with torch.inference_mode():
        y = _resampler(sample_rate)(torch.from_numpy(raw.astype(np.float32) / 32768.0)).numpy()
    rms = float(np.sqrt(np.mean(np.square(y, dtype=np.float64)))) + 1e-9
    peak = float(np.abs(y).max()) + 1e-9
    gain = min(10 ** (rng.uniform(*LEVEL_DBFS) / 20) / rms, 0.9 / peak)
    lead, trail = (int(s * SAMPLE_RATE) for s in rng.uniform(*PAD_SECONDS, size=2))
    out = np.zeros(lead + y.size + trail, np.float32)
    out[lead:lead + y.size] = y * np.float32(gain)
    # White noise floor; uniform on [-a, a] has RMS a / sqrt(3).
    a = np.float32(10 ** (rng.uniform(*noise_dbfs) / 20) * math.sqrt(3))
    out += (rng.random(out.size, dtype=np.float32) * 2 - 1) * a
    return np.clip(np.round(out * 32767.0), -32768, 32767).astype(np.int16)


def _synth_shard(args: tuple[str, Shard, str]) -> tuple[str, int, dict, float]:
    """Synthesise one shard (in a fresh worker process) and write its files and marker.

    Returns:
        The subset, the speaker id, samples per utterance id and this process's CPU seconds.
    """
    out_str, shard, fingerprint = args
    try:
        return _synth_shard_unchecked(Path(out_str), shard, fingerprint)
    except OSError:
        raise
    except Exception as exc:  # one line for people, raised again in the parent
        raise RuntimeError(f"synthesis of speaker {shard.speaker_id} ({shard.subset}, "
                           f"{shard.speaker.espeak_name}) failed: {type(exc).__name__}: {exc}"
                           ) from None


_DONE_COUNTER = None  # a shared count of synthesised utterances, set in each worker by _worker_init


def _synth_shard_unchecked(out: Path, shard: Shard, fingerprint: str):
    import soundfile as sf
    import torch

    torch.set_num_threads(1)
    # oneDNN builds a new convolution plan for every input length (about 4 ms each, and
    # every utterance has its own length); the native kernel needs no plan.
    torch.backends.mkldnn.enabled = False
    engine = espeak.Engine()
    samples = {}
    for chapter in shard.chapters:
        folder = shard.chapter_dir(out, chapter)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".*.tmp"):  # left by an interrupted run
            stale.unlink()
        for utt in chapter.utterances:
            raw = engine.synthesize(utt.spoken, shard.speaker, seed=utt.seed)
            audio = _render(raw, engine.sample_rate, utt.seed, shard.noise_dbfs)
            path = folder / f"{utt.id}.flac"
            tmp = folder / f".{path.name}.{os.getpid()}.tmp"
            # Level 0: the fastest encoder, files within 1% of the default level's size.
            sf.write(tmp, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16",
                     compression_level=0.0)
            os.replace(tmp, path)
            samples[utt.id] = int(audio.size)
            if _DONE_COUNTER is not None:  # progress per utterance, not per (long) shard
                with _DONE_COUNTER.get_lock():
                    _DONE_COUNTER.value += 1
        lines = "".join(f"{u.id} {u.transcript}\n" for u in chapter.utterances)
        _write_atomic(shard.transcript_path(out, chapter), lines.encode())
    marker = {"fingerprint": fingerprint, "samples": samples}
    shard.marker(out).parent.mkdir(parents=True, exist_ok=True)
    _write_json(shard.marker(out), marker)
    # CPU seconds of this process since its fork (its start-up included).
    return shard.subset, shard.speaker_id, samples, time.process_time()


def _worker_init(counter=None) -> None:
    """Pool initializer: count utterances in ``counter``, leave interrupts to the parent, and
    die with the process server.

    On Ctrl-C the parent terminates the pool (a half-written shard has no marker and is
    redone on the next run); workers that also raised KeyboardInterrupt would only print
    tracebacks. If the parent is killed outright, the forkserver exits and Linux sends each
    worker SIGTERM (PR_SET_PDEATHSIG) instead of letting it finish a shard nobody waits for.
    """
    global _DONE_COUNTER
    _DONE_COUNTER = counter
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def _finished(out: Path, shard: Shard, fingerprint: str) -> dict | None:
    """The shard's samples per utterance if its marker and files exist, else None."""
    try:
        marker = json.loads(shard.marker(out).read_text())
    except (OSError, ValueError):
        return None
    if marker.get("fingerprint") != fingerprint:
        return None
    for chapter in shard.chapters:
        folder = shard.chapter_dir(out, chapter)
        if not shard.transcript_path(out, chapter).exists():
            return None
        if any(not (folder / f"{u.id}.flac").exists() for u in chapter.utterances):
            return None
    return marker["samples"]


# --- corpus -------------------------------------------------------------------------------


def _config(seed: int, sizes: Mapping[str, int], voices: Sequence[str],
            variants: Sequence[str]) -> dict:
    return {"generator_version": GENERATOR_VERSION, "seed": seed,
            "sizes": {s.name: int(sizes.get(s.name, 0)) for s in SUBSETS},
            "voices": list(voices), "variants": list(variants)}


def _fingerprint(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _describe_difference(old: dict, new: dict) -> str:
    """'there: seed=0, dev-clean=4; this run: seed=3, dev-clean=5'."""
    def flat(config: dict) -> dict:
        items = {k: config.get(k) for k in ("generator_version", "seed", "voices", "variants")}
        return {**items, **config.get("sizes", {})}

    there, here = flat(old), flat(new)
    keys = [k for k in here if there.get(k) != here[k]]

    def value(v) -> str:
        if not isinstance(v, list):
            return str(v)
        return ",".join(v) if len(v) <= 6 else ",".join(v[:4]) + f",... ({len(v)} names)"

    def show(values: dict) -> str:
        return ", ".join(f"{k}={value(values.get(k))}" for k in keys)

    return f"there: {show(there)}; this run: {show(here)}"


def _claim_folder(out: Path, config: dict) -> None:
    """Make ``out`` this corpus's folder, or raise ValueError if it holds something else."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: choose a folder")
    meta_path = out / METADATA
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text())["config"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{meta_path} is unreadable ({exc}): delete the folder {out} "
                             "or choose another --out folder") from None
        if old != config:
            raise ValueError(
                f"{out} already holds another generated corpus "
                f"({_describe_difference(old, config)}): rerun with its arguments to resume it, "
                "or choose another --out folder"
            )
        return
    if out.exists() and any(not p.name.startswith(f".{METADATA}.") for p in out.iterdir()):
        raise ValueError(f"--out {out} is not empty and holds no {METADATA} (not a generated "
                         "corpus): choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(meta_path, {"config": config, "complete": False})


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _validate_sizes(sizes: Mapping[str, int] | None) -> dict[str, int]:
    if sizes is None:
        return {s.name: s.default_size for s in SUBSETS}
    unknown = set(sizes) - set(_SUBSET)
    if unknown:
        raise ValueError(f"unknown subset(s) {sorted(unknown)} in sizes: use "
                         f"{', '.join(_SUBSET)}")
    out = {}
    for s in SUBSETS:
        n = sizes.get(s.name, 0)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{s.flag} (size of {s.name}) must be an integer >= 0, got {n!r}")
        out[s.name] = n
    if sum(out.values()) == 0:
        raise ValueError("every subset size is 0: ask for at least one utterance, e.g. --train 12")
    return out


def _speakers_txt(meta_speakers: dict, minutes: dict[int, float]) -> str:
    lines = [
        "; Generated speakers (orchestrator.data.synth), LibriSpeech's SPEAKERS.TXT format.",
        "; NAME is the eSpeak NG voice+variant, rate (wpm) and pitch.",
        ";ID  |SEX| SUBSET           |MINUTES| NAME",
    ]
    for sid in sorted(meta_speakers, key=int):
        sp = meta_speakers[sid]
        lines.append(f"{int(sid):<5}| {sp['sex']} | {sp['subset']:<17}| {minutes[int(sid)]:5.2f} | "
                     f"{sp['voice']}+{sp['variant']} rate {sp['rate']} pitch {sp['pitch']}")
    return "\n".join(lines) + "\n"


def generate_corpus(out: str | os.PathLike, *, seed: int = 0,
                    sizes: Mapping[str, int] | None = None, workers: int | None = None,
                    voices: Sequence[str] | None = None, variants: Sequence[str] | None = None,
                    progress: bool = False) -> dict:
    """Generate (or finish) a corpus in ``out``.

    Args:
        out: corpus root folder (created; must be new, empty, or this same corpus).
        seed: corpus seed (>= 0); the same seed and sizes give byte-identical audio.
        sizes: utterances per subset, e.g. ``{"train-clean-100": 12, "dev-clean": 4}``;
            missing subsets get 0. Default: each subset's ``default_size``.
        workers: worker processes (default: the CPUs this process may use).
        voices: English voices to draw speakers from (default ``list_voices()``).
        variants: voice variants to draw speakers from (default ``espeak.DEFAULT_VARIANTS``).
        progress: print progress lines to stderr.

    Returns:
        A summary: ``out``, ``counts`` (utterances per subset), ``generated`` (utterances
        synthesised by this call), ``shards``, ``shards_skipped``, ``seconds`` (wall clock),
        ``utt_per_s`` (generated / seconds), ``worker_cpu_seconds`` and ``utt_per_cpu_s``
        (throughput per busy core, which shared machines do not disturb), ``audio_hours``
        (whole corpus) and ``hours`` per subset.

    Raises:
        ValueError: a bad argument, an unknown voice or variant, or ``out`` holding
            something other than this corpus. The message is one line for people.
    """
    start = time.perf_counter()
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed must be an integer >= 0, got {seed!r}")
    sizes = _validate_sizes(sizes)
    workers = _default_workers() if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"--workers must be an integer >= 1, got {workers!r}")
    voices = tuple(list_voices() if voices is None else (v.lower() for v in voices))
    variants = tuple(espeak.DEFAULT_VARIANTS if variants is None else variants)
    if not voices or not variants:
        raise ValueError("--voices and --variants need at least one name each")
    for name in voices:
        espeak.check_voice(name)
    for name in variants:
        espeak.check_variant(name)
    voices, variants = tuple(dict.fromkeys(voices)), tuple(dict.fromkeys(variants))

    out = Path(out)
    config = _config(seed, sizes, voices, variants)
    fingerprint = _fingerprint(config)
    shards = plan_corpus(seed=seed, sizes=sizes, voices=voices, variants=variants)
    _claim_folder(out, config)

    done: dict[str, dict] = {}
    pending = []
    for shard in shards:
        samples = _finished(out, shard, fingerprint)
        if samples is None:
            pending.append(shard)
        else:
            done[f"{shard.subset}/{shard.speaker_id}"] = samples
    skipped = len(done)
    generated, cpu_seconds = 0, 0.0
    if pending:
        generated, cpu_seconds = _run_shards(out, pending, fingerprint, workers, progress, done)

    # Metadata, from the plan and the markers only: identical for identical corpora.
    n_samples = {k: sum(v.values()) for k, v in done.items()}
    hours = {s: 0.0 for s in sizes if sizes[s]}
    minutes: dict[int, float] = {}
    speakers = {}
    for shard in shards:
        n = n_samples[f"{shard.subset}/{shard.speaker_id}"]
        hours[shard.subset] += n / SAMPLE_RATE / 3600
        minutes[shard.speaker_id] = n / SAMPLE_RATE / 60
        speakers[str(shard.speaker_id)] = {
            "subset": shard.subset, **asdict(shard.speaker),
            "sex": espeak.variant_sex(shard.speaker.variant),
            "chapters": [c.id for c in shard.chapters],
        }
    used_words = {w for sh in shards for u in sh.utterances for w in u.transcript.split()}
    durations = [n / SAMPLE_RATE for v in done.values() for n in v.values()]
    meta = {
        "config": config,
        "complete": True,
        "fingerprint": fingerprint,
        "generator": "orchestrator.data.synth",
        "espeak_ng": espeak.espeak_version(),
        "sample_rate": SAMPLE_RATE,
        "speakers_held_out": True,
        "vocabulary_size": len(vocabulary()),
        "vocabulary_used": len(used_words),
        "subsets": {
            name: {"utterances": n, "hours": round(hours[name], 4),
                   "speakers": sum(1 for sp in speakers.values() if sp["subset"] == name),
                   "chapters": sum(len(sh.chapters) for sh in shards if sh.subset == name)}
            for name, n in sizes.items() if n
        },
        "duration_seconds": {"min": round(min(durations), 3), "max": round(max(durations), 3),
                             "mean": round(sum(durations) / len(durations), 3)},
        "speakers": speakers,
    }
    _write_json(out / METADATA, meta)
    _write_atomic(out / "SPEAKERS.TXT", _speakers_txt(speakers, minutes).encode())
    seconds = time.perf_counter() - start
    return {
        "out": str(out),
        "counts": {name: n for name, n in sizes.items() if n},
        "generated": generated,
        "shards": len(shards),
        "shards_skipped": skipped,
        "seconds": round(seconds, 3),
        "utt_per_s": round(generated / seconds, 1),
        "worker_cpu_seconds": round(cpu_seconds, 2),
        "utt_per_cpu_s": round(generated / cpu_seconds, 1) if cpu_seconds else 0.0,
        "audio_hours": round(sum(hours.values()), 4),
        "hours": {k: round(v, 4) for k, v in hours.items()},
    }


def _run_shards(out: Path, pending: list[Shard], fingerprint: str, workers: int,
                progress: bool, done: dict[str, dict]) -> tuple[int, float]:
    """Synthesise ``pending`` shards, each in a fresh process; fill ``done``.

    Returns:
        The utterances synthesised and the worker processes' CPU seconds.
    """
    methods = multiprocessing.get_all_start_methods()
    # forkserver: each task gets a new process forked from a clean server that has imported
    # and exercised torch once (a start costs milliseconds, not seconds) and never loaded
    # eSpeak; spawn where there is no forkserver (Windows). "__main__" is the forkserver's
    # default preload. This module itself is not preloaded: under
    # `python -m orchestrator.data.synth` every child re-runs it as __mp_main__, and runpy
    # warns when it is already imported.
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(["__main__", "orchestrator.data._synth_forkserver",
                                    "orchestrator.data.espeak", "orchestrator.data.grammar"])
    total = sum(len(s.utterances) for s in pending)
    generated, cpu_seconds = 0, 0.0
    tasks = [(str(out), shard, fingerprint) for shard in pending]
    counter = ctx.Value("q", 0)
    meter = _Progress(total, enabled=progress)
    with ctx.Pool(processes=min(workers, len(pending)), initializer=_worker_init, initargs=(counter,),
                  maxtasksperchild=1) as pool:
        results = pool.imap_unordered(_synth_shard, tasks)
        for _ in range(len(tasks)):
            while True:  # wake up now and then to report progress inside long shards
                try:
                    subset, speaker_id, samples, cpu = results.next(timeout=meter.every_s)
                    break
                except multiprocessing.TimeoutError:
                    meter.update(counter.value)
            done[f"{subset}/{speaker_id}"] = samples
            cpu_seconds += cpu
            generated += len(samples)
            meter.update(max(generated, counter.value))
    meter.update(generated, final=True)
    return generated, cpu_seconds


PROGRESS_EVERY_S = 5.0


class _Progress:
    """Progress lines on stderr: ``count/total (percent), rate, ETA`` every ``every_s`` seconds."""

    def __init__(self, total: int, *, enabled: bool, every_s: float | None = None) -> None:
        every_s = PROGRESS_EVERY_S if every_s is None else every_s
        self.total, self.enabled, self.every_s = total, enabled, every_s
        self.start = self.last = time.perf_counter()

    def update(self, count: int, *, final: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or not (final or now - self.last >= self.every_s):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = count / elapsed
        eta = f", ETA {(self.total - count) / rate:.0f} s" if rate > 0 and count < self.total else ""
        print(f"synth: {count}/{self.total} utterances ({100 * count / max(self.total, 1):.0f}%), "
              f"{rate:.1f} utt/s{eta}" + (f", done in {elapsed:.0f} s" if final else ""),
              file=sys.stderr, flush=True)


# --- CLI ----------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        self.exit(2, f"error: {message} (see python -m orchestrator.data.synth --help)\n")


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="python -m orchestrator.data.synth",
                     description="Generate a LibriSpeech-layout speech corpus with eSpeak NG.")
    parser.add_argument("--out", help="corpus root folder (new, empty, or this same corpus)")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    for s in SUBSETS:
        parser.add_argument(s.flag, type=int, default=s.default_size, metavar="N",
                            help=f"{s.name} utterances (default {s.default_size}; 0 = none)")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes (default: the CPUs available)")
    parser.add_argument("--voices", type=_names, default=None,
                        help="comma-separated English voices (default: all, see --list-voices)")
    parser.add_argument("--variants", type=_names, default=None,
                        help="comma-separated voice variants (default: a curated human-like set)")
    parser.add_argument("--list-voices", action="store_true",
                        help="print the voices and variants, then exit")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    from orchestrator.errors import configure_logging

    configure_logging(quiet=args.quiet)
    # `kill` takes the same path as Ctrl-C: workers stopped, a one-line message, resumable.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if args.list_voices:
            print(json.dumps({"voices": list(list_voices()),
                              "default_variants": list(espeak.DEFAULT_VARIANTS),
                              "variants": list(list_variants())}, indent=1))
            return 0
        if not args.out:
            raise ValueError("--out DIR is required: the folder to write the corpus to")
        summary = generate_corpus(
            args.out, seed=args.seed, workers=args.workers, voices=args.voices,
            variants=args.variants, progress=not args.quiet,
            sizes={s.name: getattr(args, s.flag.lstrip("-").replace("-", "_")) for s in SUBSETS},
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"error: {exc}: rerun the same command to resume; report it if it repeats",
              file=sys.stderr)
        return 1
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        print(f"error: cannot write{where}: {exc.strerror or exc}: check the --out folder's "
              "permissions and free space, then rerun the same command to resume",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    # Run the imported module, not __main__, so worker tasks pickle by the module's real name.
    from orchestrator.data.synth import main as _main

    sys.exit(_main())
