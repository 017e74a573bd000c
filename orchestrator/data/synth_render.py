"""The audio of a generated corpus: eSpeak NG's samples rendered to 16 kHz FLAC, shard by shard.

A shard (one speaker, all its chapters; see ``synth_plan.Shard``) is synthesised in a fresh
worker process (``forkserver`` start method, one task per process), because eSpeak keeps state
between utterances that cannot be reset (see ``espeak.py``): a fresh process making the same
calls in the same order gives the same samples. Per utterance the voice is reloaded, every
parameter set, and eSpeak's and libc's generators seeded; the rendering (resampling, level,
silence padding, noise floor) runs single-threaded, so its float arithmetic is reproducible.

Every file goes through ``orchestrator.fileio``'s atomic write; a shard's done marker is written
last, so ``finished_shard`` can tell a complete shard from an interrupted one.
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing
import signal
import sys
import time
from pathlib import Path
from typing import Protocol

import numpy as np

from orchestrator.data import espeak
from orchestrator.data.synth_plan import PAD_SECONDS, SAMPLE_RATE, Shard
from orchestrator.fileio import atomic_output, atomic_write_json, atomic_write_text

__all__ = ["finished_shard", "run_shards"]

LEVEL_DBFS = (-30.0, -18.0)  # speech RMS level


class Meter(Protocol):
    """What ``run_shards`` reports progress to (``synth._Progress``)."""

    every_s: float

    def update(self, count: int, *, final: bool = False) -> None: ...


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
            with atomic_output(folder / f"{utt.id}.flac") as tmp:
                # Level 0: the fastest encoder, files within 1% of the default level's size.
                sf.write(tmp, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16",
                         compression_level=0.0)
            samples[utt.id] = int(audio.size)
            if _DONE_COUNTER is not None:  # progress per utterance, not per (long) shard
                with _DONE_COUNTER.get_lock():
                    _DONE_COUNTER.value += 1
        lines = "".join(f"{u.id} {u.transcript}\n" for u in chapter.utterances)
        atomic_write_text(shard.transcript_path(out, chapter), lines)
    atomic_write_json(shard.marker(out), {"fingerprint": fingerprint, "samples": samples})
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


def finished_shard(out: Path, shard: Shard, fingerprint: str) -> dict | None:
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


def run_shards(out: Path, pending: list[Shard], fingerprint: str, workers: int,
               meter: Meter, done: dict[str, dict]) -> tuple[int, float]:
    """Synthesise ``pending`` shards, each in a fresh process; fill ``done``; report to ``meter``.

    Returns:
        The utterances synthesised and the worker processes' CPU seconds.
    """
    methods = multiprocessing.get_all_start_methods()
    # forkserver: each task gets a new process forked from a clean server that has imported
    # and exercised torch once (a start costs milliseconds, not seconds) and never loaded
    # eSpeak; spawn where there is no forkserver (Windows). "__main__" is the forkserver's
    # default preload. ``synth`` itself is not preloaded: under
    # `python -m orchestrator.data.synth` every child re-runs it as __mp_main__, and runpy
    # warns when it is already imported.
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(["__main__", "orchestrator.data._synth_forkserver",
                                    "orchestrator.data.espeak", "orchestrator.data.grammar",
                                    "orchestrator.data.synth_render"])
    generated, cpu_seconds = 0, 0.0
    tasks = [(str(out), shard, fingerprint) for shard in pending]
    counter = ctx.Value("q", 0)
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
