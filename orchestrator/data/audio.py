"""Audio files: headers without decoding, and decoding to 16 kHz mono float32.

Legend: s samples (at the target rate), c channels.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf

from orchestrator.data import s3
from orchestrator.data.errors import CorpusError

if TYPE_CHECKING:
    import torch

TARGET_RATE = 16000
# Extensions the corpus readers treat as audio; libsndfile reads all of them.
AUDIO_EXTENSIONS = (".flac", ".wav", ".ogg", ".mp3")
CACHE_ENV = "POM_ABLATIONS_CACHE"
TAIL_CHECK_FRAMES = 1024  # decoded at the end of every file when its header is read


class AudioError(CorpusError):
    """One audio file cannot be used.

    Attributes:
        path: the file (local path or ``s3://`` URI).
        reason: a short reason, e.g. ``"empty file (0 bytes)"``.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(
            f"bad audio file {self.path}: {reason}: replace or delete the file "
            "(the manifest is rebuilt when the corpus changes)"
        )


@dataclass(frozen=True)
class AudioInfo:
    """What a file header says: frames per channel, sample rate and channel count."""

    frames: int
    sample_rate: int
    channels: int

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.frames / self.sample_rate


def default_cache_dir() -> Path:
    """``$POM_ABLATIONS_CACHE``, else ``$XDG_CACHE_HOME/pom-ablations`` (``~/.cache/...``).

    Holds ``s3/`` (downloaded objects) and ``manifests/``. Ray workers on other nodes use
    their own copy of this folder; point the variable at a run directory to keep a sweep's
    cache with the sweep.
    """
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base, "pom-ablations")


def s3_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    """The folder of downloaded S3 objects under ``cache_dir`` (default ``default_cache_dir()``)."""
    return Path(cache_dir if cache_dir is not None else default_cache_dir(), "s3")


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    # libsndfile repeats the path in its messages; the path is reported separately.
    return text.replace("Error opening ", "").strip() or type(exc).__name__


def read_info(path: str | os.PathLike) -> AudioInfo:
    """Read the header of a local audio file, and decode only its last ``TAIL_CHECK_FRAMES`` samples.

    Raises:
        AudioError: the file is missing, unreadable, empty, not audio, holds no samples, or is
            truncated or corrupt at its end.
    """
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise AudioError(str(path), f"cannot open ({exc.strerror or exc})") from None
    if size == 0:
        raise AudioError(str(path), "empty file (0 bytes)")
    try:
        info = sf.info(str(path))
    except (sf.SoundFileError, RuntimeError, OSError, ValueError) as exc:
        raise AudioError(str(path), f"not a readable audio file ({_short(exc)})") from None
    if info.samplerate <= 0 or info.channels <= 0:
        raise AudioError(str(path), f"bad header (rate {info.samplerate}, {info.channels} channels)")
    if info.frames <= 0:
        raise AudioError(str(path), "no audio frames")
    # A truncated or partly overwritten file often keeps a valid header; decoding its last
    # samples (a seek and one small read, not the whole file) finds it before training does.
    try:
        with sf.SoundFile(str(path)) as handle:
            handle.seek(max(0, int(info.frames) - TAIL_CHECK_FRAMES))
            tail = handle.read(TAIL_CHECK_FRAMES, dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, OSError, ValueError) as exc:
        raise AudioError(str(path), f"truncated or corrupt: its last samples cannot be decoded ({_short(exc)})") from None
    if tail.shape[0] == 0:
        raise AudioError(str(path), "truncated: the header promises more samples than the file holds")
    return AudioInfo(
        frames=int(info.frames), sample_rate=int(info.samplerate), channels=int(info.channels)
    )


def resampled_length(frames: int, orig_rate: int, target_rate: int) -> int:
    """Samples after resampling ``frames`` samples from ``orig_rate`` to ``target_rate``."""
    g = math.gcd(orig_rate, target_rate)
    return math.ceil(frames * (target_rate // g) / (orig_rate // g))


def decode(
    path: str | os.PathLike, *, target_rate: int | None = TARGET_RATE, name: str | None = None
) -> torch.Tensor:
    """Decode a local audio file to a mono float32 tensor.

    Args:
        path: a local audio file in any format libsndfile reads.
        target_rate: resample to this rate; None keeps the file's rate.
        name: how to name the file in errors (e.g. its ``s3://`` URI); default ``path``.

    Returns:
        waveform: (s,) float32; channels are averaged, values in [-1, 1].

    Raises:
        AudioError: the file cannot be decoded.
    """
    import torch

    name = name or str(path)
    if not os.path.isfile(path):
        raise AudioError(name, "no such file")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (s, c)
    except (sf.SoundFileError, RuntimeError, OSError, ValueError) as exc:
        raise AudioError(name, f"cannot decode ({_short(exc)})") from None
    if data.shape[0] == 0:
        raise AudioError(name, "no audio frames")
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]  # (s,)
    wave = torch.from_numpy(np.ascontiguousarray(mono))
    if target_rate is not None and rate != target_rate:
        import torchaudio.functional as AF

        wave = AF.resample(wave, orig_freq=int(rate), new_freq=int(target_rate))
    return wave


def local_copy(path_or_uri: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local path for ``path_or_uri``: the path itself, or the cached copy of an S3 object."""
    if s3.is_s3_uri(path_or_uri):
        return s3.fetch(str(path_or_uri), cache_dir=s3_cache_dir(cache_dir))
    return Path(path_or_uri)


def load_audio(
    path_or_uri: str | os.PathLike,
    *,
    target_rate: int | None = TARGET_RATE,
    cache_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """Load one utterance as a mono float32 waveform at ``target_rate``.

    Args:
        path_or_uri: a local file or an ``s3://bucket/key`` URI (fetched once into the cache).
        target_rate: output sample rate in Hz (16 kHz for the encoders); None keeps the file's.
        cache_dir: cache root for S3 objects (default ``default_cache_dir()``).

    Returns:
        waveform: (s,) float32.

    Raises:
        AudioError: the file cannot be decoded (the message names it).
        CorpusError: the S3 object cannot be fetched.
    """
    local = local_copy(path_or_uri, cache_dir=cache_dir)
    return decode(local, target_rate=target_rate, name=str(path_or_uri))
