"""The plan of a generated corpus: subsets, speakers, chapters and sentences, all but the audio.

``plan_corpus`` draws everything from string-seeded ``random.Random`` generators in the parent
process, so the same seed and sizes give the same plan whatever the number of workers. Speakers
are held out: a speaker is a fixed (voice, variant, rate, pitch) combination, and no
combination, and no speaker id, appears in two subsets. Sentences come from ``grammar.py`` and
are picked to last near a random target length; every transcript is unique in the corpus,
train's drawn first, so dev and test sentences never occur in train. The audio is rendered by
``synth_render.py``; ``synth.py`` ties both together.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from orchestrator.data.errors import CorpusError
from orchestrator.data.espeak import SpeakerSpec
from orchestrator.data.grammar import TRANSCRIPT_RE, Grammar, Sentence

__all__ = [
    "SUBSETS", "Chapter", "Shard", "Subset", "UtterancePlan", "estimate_seconds", "plan_corpus",
]

GENERATOR_VERSION = 1
SAMPLE_RATE = 16000
STATE_DIR = ".synth"
# Target utterance length (seconds, silence padding included); the sentence whose estimated
# duration is nearest a uniform draw in this range is kept.
TARGET_SECONDS = (1.8, 5.3)
ALLOWED_ESTIMATE = (1.7, 5.5)
PAD_SECONDS = (0.05, 0.25)  # leading and trailing silence, each


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
            raise CorpusError(
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

