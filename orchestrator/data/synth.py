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
``plan_corpus(...)`` (everything but the audio, from ``synth_plan.py``), ``list_voices()``,
``list_variants()``. The audio is rendered by ``synth_render.py``.

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
import hashlib
import json
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Mapping, Sequence

from orchestrator.data import espeak
from orchestrator.data.errors import CorpusError
from orchestrator.data.espeak import list_variants, list_voices
from orchestrator.data.grammar import vocabulary
from orchestrator.data.synth_plan import GENERATOR_VERSION, SAMPLE_RATE, SUBSETS, plan_corpus
from orchestrator.data.synth_render import finished_shard, run_shards
from orchestrator.fileio import atomic_write_json, atomic_write_text

__all__ = ["SUBSETS", "generate_corpus", "list_voices", "list_variants", "plan_corpus", "main"]

METADATA = "corpus.json"



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
    """Make ``out`` this corpus's folder, or raise CorpusError if it holds something else."""
    if out.exists() and not out.is_dir():
        raise CorpusError(f"--out {out} is a file: choose a folder")
    meta_path = out / METADATA
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text())["config"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CorpusError(f"{meta_path} is unreadable ({exc}): delete the folder {out} "
                             "or choose another --out folder") from None
        if old != config:
            raise CorpusError(
                f"{out} already holds another generated corpus "
                f"({_describe_difference(old, config)}): rerun with its arguments to resume it, "
                "or choose another --out folder"
            )
        return
    if out.exists() and any(not p.name.startswith(f".{METADATA}.") for p in out.iterdir()):
        raise CorpusError(f"--out {out} is not empty and holds no {METADATA} (not a generated "
                         "corpus): choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(meta_path, {"config": config, "complete": False})


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _validate_sizes(sizes: Mapping[str, int] | None) -> dict[str, int]:
    if sizes is None:
        return {s.name: s.default_size for s in SUBSETS}
    names = [s.name for s in SUBSETS]
    unknown = set(sizes) - set(names)
    if unknown:
        raise CorpusError(f"unknown subset(s) {sorted(unknown)} in sizes: use {', '.join(names)}")
    out = {}
    for s in SUBSETS:
        n = sizes.get(s.name, 0)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise CorpusError(f"{s.flag} (size of {s.name}) must be an integer >= 0, got {n!r}")
        out[s.name] = n
    if sum(out.values()) == 0:
        raise CorpusError("every subset size is 0: ask for at least one utterance, e.g. --train 12")
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
        CorpusError: a bad argument, an unknown voice or variant, or ``out`` holding
            something other than this corpus. The message is one line for people.
    """
    start = time.perf_counter()
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise CorpusError(f"--seed must be an integer >= 0, got {seed!r}")
    sizes = _validate_sizes(sizes)
    workers = _default_workers() if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise CorpusError(f"--workers must be an integer >= 1, got {workers!r}")
    voices = tuple(list_voices() if voices is None else (v.lower() for v in voices))
    variants = tuple(espeak.DEFAULT_VARIANTS if variants is None else variants)
    if not voices or not variants:
        raise CorpusError("--voices and --variants need at least one name each")
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
        samples = finished_shard(out, shard, fingerprint)
        if samples is None:
            pending.append(shard)
        else:
            done[f"{shard.subset}/{shard.speaker_id}"] = samples
    skipped = len(done)
    generated, cpu_seconds = 0, 0.0
    if pending:
        meter = _Progress(sum(len(s.utterances) for s in pending), enabled=progress)
        generated, cpu_seconds = run_shards(out, pending, fingerprint, workers, meter, done)

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
    atomic_write_json(out / METADATA, meta)
    atomic_write_text(out / "SPEAKERS.TXT", _speakers_txt(speakers, minutes))
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
    from orchestrator.errors import cli_main, configure_logging

    configure_logging(quiet=args.quiet)
    # `kill` takes the same path as Ctrl-C: workers stopped, a one-line message, resumable.
    signal.signal(signal.SIGTERM, _raise_interrupt)

    def body() -> int:
        if args.list_voices:
            print(json.dumps({"voices": list(list_voices()),
                              "default_variants": list(espeak.DEFAULT_VARIANTS),
                              "variants": list(list_variants())}, indent=1))
            return 0
        if not args.out:
            raise CorpusError("--out DIR is required: the folder to write the corpus to")
        summary = generate_corpus(
            args.out, seed=args.seed, workers=args.workers, voices=args.voices,
            variants=args.variants, progress=not args.quiet,
            sizes={s.name: getattr(args, s.flag.lstrip("-").replace("-", "_")) for s in SUBSETS},
        )
        print(json.dumps(summary))
        return 0

    try:
        return cli_main(body)  # a bad flag or --out folder: one error line, exit 2
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


if __name__ == "__main__":
    # Run the imported module, not __main__, so worker tasks pickle by the module's real name.
    from orchestrator.data.synth import main as _main

    sys.exit(_main())
