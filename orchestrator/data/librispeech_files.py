"""The files of a LibriSpeech-layout corpus: where they are, and the utterances they hold.

A corpus root is a local folder or an S3 prefix (``LocalSource``, ``S3Source``; ``open_source``
picks one). A source lists a subset's audio and transcript files (name, size, and an mtime or
ETag for the manifest's fingerprint) and makes them readable as local files (S3 objects are
downloaded once into the cache, see ``orchestrator.data.s3``). ``match_subset`` pairs transcript
lines with audio folder by folder and reads the audio headers; everything bad is collected as
``Skipped`` items, never raised. ``librispeech.py`` builds, caches and filters the manifest on top.
"""

from __future__ import annotations

import os
import posixpath
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from orchestrator.data import s3
from orchestrator.data.audio import AUDIO_EXTENSIONS, AudioError, read_info
from orchestrator.data.errors import CorpusError
from orchestrator.data.s3 import is_s3_uri, split_s3_uri
from orchestrator.data.types import Utterance

__all__ = [
    "CorpusFile", "LocalSource", "S3Source", "Skipped", "Source", "match_subset", "open_source",
    "subset_exists",
]

TRANSCRIPT_SUFFIX = ".trans.txt"
LAYOUT = "<root>/<subset>/<speaker>/<chapter>/<spk>-<chap>-<utt>.flac with <spk>-<chap>.trans.txt"
DOWNLOAD_THREADS = 8


@dataclass(frozen=True, kw_only=True)
class Skipped:
    """One item left out of a manifest.

    Attributes:
        path: the audio file, transcript file or folder (local path or ``s3://`` URI).
        reason: why, for people, e.g. ``"empty file (0 bytes)"``.
        kind: for counting: ``bad_audio``, ``no_transcript``, ``no_audio``,
            ``empty_transcript``, ``duplicate``, ``unreadable``.
    """

    path: str
    reason: str
    kind: str



@dataclass(frozen=True)
class CorpusFile:
    """A corpus file relative to its subset folder; ``error`` is set for unlistable folders."""

    rel: str
    size: int
    stamp: str
    error: str | None = None


def _is_corpus_file(name: str) -> bool:
    low = name.lower()
    return low.endswith(TRANSCRIPT_SUFFIX) or os.path.splitext(low)[1] in AUDIO_EXTENSIONS


class LocalSource:
    """A corpus root on the local file system (symlinks followed, cycles skipped)."""

    def __init__(self, root: str | os.PathLike) -> None:
        path = Path(root).expanduser()
        if not path.exists():
            raise CorpusError(
                f"corpus root {path} does not exist: check the path (expected {LAYOUT})"
            )
        if not path.is_dir():
            raise CorpusError(f"corpus root {path} is not a folder: pass the folder holding the subsets")
        self.root = path.resolve()
        self.label = str(self.root)
        self.identity = f"file|{self.root}"

    def subsets(self) -> list[str]:
        names = []
        for child in sorted(self.root.iterdir()):
            if child.is_dir() and any(True for _ in self._walk(child, first_only=True)):
                names.append(child.name)
        return names

    def list_files(self, subset: str) -> list[CorpusFile]:
        folder = self.root / subset
        return sorted(self._walk(folder), key=lambda f: f.rel) if folder.is_dir() else []

    def _walk(self, top: Path, first_only: bool = False):
        seen: set[tuple[int, int]] = set()
        stack = [(top, "")]
        while stack:
            folder, rel = stack.pop()
            try:
                st = folder.stat()
                if (st.st_dev, st.st_ino) in seen:  # a symlink cycle
                    continue
                seen.add((st.st_dev, st.st_ino))
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError as exc:
                yield CorpusFile(rel or ".", -1, "", f"cannot list folder ({exc.strerror or exc})")
                continue
            for entry in entries:
                name = f"{rel}{entry.name}"
                try:
                    is_dir = entry.is_dir()
                except OSError:
                    is_dir = False
                if is_dir:
                    stack.append((Path(entry.path), name + "/"))
                    continue
                if not _is_corpus_file(entry.name):
                    continue
                try:
                    st = entry.stat()
                    yield CorpusFile(name, st.st_size, str(st.st_mtime_ns))
                except OSError:  # e.g. a dangling symlink: reported when its header is read
                    yield CorpusFile(name, -1, "stat-failed")
                if first_only:
                    return

    def location(self, subset: str, rel: str) -> str:
        return str(self.root / subset / rel)

    def materialise(
        self, subset: str, files: Sequence[CorpusFile], cache_dir: Path
    ) -> dict[str, Path | CorpusError]:
        return {f.rel: self.root / subset / f.rel for f in files}


class S3Source:
    """A corpus root under ``s3://bucket/prefix``; objects are downloaded into the cache to read."""

    def __init__(self, uri: str) -> None:
        self.bucket, prefix = split_s3_uri(uri)
        prefix = prefix.strip("/")
        self.base = f"{prefix}/" if prefix else ""
        self.label = s3.join_s3_uri(self.bucket, prefix)
        self.identity = f"s3|{s3.endpoint_url() or 'aws'}|{self.label}"
        if not s3.prefix_exists(self.bucket, self.base):
            if not self.base:
                raise CorpusError(
                    f"S3 bucket '{self.bucket}' is empty at {s3.describe_endpoint()}: upload the "
                    f"corpus with `python -m orchestrator.data.librispeech upload LOCAL s3://{self.bucket}/PREFIX`"
                )
            raise CorpusError(
                f"S3 prefix {self.label} does not exist (no objects under it) at "
                f"{s3.describe_endpoint()}: "
                f"check the URI, or upload the corpus with `python -m orchestrator.data.librispeech "
                f"upload LOCAL {self.label}`"
            )

    def subsets(self) -> list[str]:
        return s3.list_folders(self.bucket, self.base)

    def list_files(self, subset: str) -> list[CorpusFile]:
        prefix = f"{self.base}{subset}/"
        files = []
        for obj in s3.list_objects(self.bucket, prefix):
            rel = obj.key[len(prefix):]
            if rel and _is_corpus_file(posixpath.basename(rel)):
                files.append(CorpusFile(rel, obj.size, obj.etag))
        return sorted(files, key=lambda f: f.rel)

    def location(self, subset: str, rel: str) -> str:
        return s3.join_s3_uri(self.bucket, f"{self.base}{subset}/{rel}")

    def materialise(
        self, subset: str, files: Sequence[CorpusFile], cache_dir: Path
    ) -> dict[str, Path | CorpusError]:
        """Download ``files`` into the cache in parallel (each object once per ETag)."""

        def one(f: CorpusFile) -> Path | CorpusError:
            uri = self.location(subset, f.rel)
            try:
                return s3.fetch(uri, cache_dir=cache_dir, etag=f.stamp, size=f.size)
            except s3.S3NotFoundError as exc:  # deleted since the listing: skip this file only
                return exc

        with ThreadPoolExecutor(max_workers=DOWNLOAD_THREADS) as pool:
            return dict(zip((f.rel for f in files), pool.map(one, files)))


Source = LocalSource | S3Source


def open_source(root: str | os.PathLike) -> Source:
    """The source of a corpus root: ``s3://bucket/prefix`` or a local folder."""
    return S3Source(str(root)) if is_s3_uri(str(root)) else LocalSource(root)


def subset_exists(source: Source, subset: str) -> bool:
    """Whether ``subset`` is a folder of ``source`` (perhaps holding no corpus file)."""
    if isinstance(source, LocalSource):
        return (source.root / subset).is_dir()
    return s3.prefix_exists(source.bucket, f"{source.base}{subset}/")


def _speaker(uid: str, rel: str) -> str:
    parts = rel.split("/")
    # <speaker>/<chapter>/<file>: the folder is authoritative; else the id's first field.
    return parts[0] if len(parts) >= 3 else uid.split("-", 1)[0]


def _stem(rel: str) -> str:
    return os.path.splitext(posixpath.basename(rel))[0]


def match_subset(
    source: Source, subset: str, files: list[CorpusFile], cache_dir: Path
) -> tuple[list[Utterance], list[Skipped]]:
    """Match transcripts and audio folder by folder, read audio headers, collect what is bad."""
    utterances: list[Utterance] = []
    skipped: list[Skipped] = []

    def skip(path: str, reason: str, kind: str) -> None:
        skipped.append(Skipped(path=path, reason=reason, kind=kind))

    folders: dict[str, dict[str, list[CorpusFile]]] = defaultdict(lambda: {"audio": [], "trans": []})
    for f in files:
        if f.error:
            skip(source.location(subset, f.rel), f.error, "unreadable")
            continue
        folder, name = posixpath.split(f.rel)
        folders[folder]["trans" if name.lower().endswith(TRANSCRIPT_SUFFIX) else "audio"].append(f)

    # 1. Transcripts. Per folder: id -> (text, transcript location, line number); "" = empty line.
    all_trans = [t for group in folders.values() for t in group["trans"]]
    local_trans = source.materialise(subset, all_trans, cache_dir)
    lines: dict[str, dict[str, tuple[str, str, int]]] = {}
    for folder, group in sorted(folders.items()):
        found: dict[str, tuple[str, str, int]] = {}
        for t in group["trans"]:
            loc = source.location(subset, t.rel)
            local = local_trans[t.rel]
            try:
                if isinstance(local, CorpusError):
                    raise OSError(str(local))
                content = local.read_text(encoding="utf-8-sig")
            except (OSError, UnicodeDecodeError) as exc:
                skip(loc, f"unreadable transcript file ({exc})", "unreadable")
                continue
            for number, line in enumerate(content.splitlines(), start=1):
                fields = line.split(maxsplit=1)
                if not fields:
                    continue
                uid = fields[0]
                # Kept as written (the tokenizer owns the vocabulary); only whitespace is normalised.
                text = " ".join(fields[1].split()) if len(fields) > 1 else ""
                if uid in found:
                    _, first_loc, first_number = found[uid]
                    skip(loc, f"line {number}: duplicate transcript line for {uid} "
                         f"(first at {first_loc} line {first_number}, which is kept)", "duplicate")
                    continue
                found[uid] = (text, loc, number)
        lines[folder] = found

    # 2. Audio matched to transcript lines in the same folder (no header read yet).
    wanted: list[CorpusFile] = []
    for folder, group in sorted(folders.items()):
        found = lines[folder]
        seen: dict[str, str] = {}
        for a in group["audio"]:
            loc, uid = source.location(subset, a.rel), _stem(a.rel)
            if uid in seen:  # e.g. both x.flac and x.wav
                skip(loc, f"duplicate audio for {uid} (also {seen[uid]})", "duplicate")
                continue
            seen[uid] = loc
            if uid not in found:
                names = ", ".join(posixpath.basename(t.rel) for t in group["trans"])
                names = names or f"no *{TRANSCRIPT_SUFFIX} in its folder"
                skip(loc, f"no transcript line for {uid} ({names})", "no_transcript")
            elif not found[uid][0]:
                skip(loc, f"empty transcript at {found[uid][1]} line {found[uid][2]}", "empty_transcript")
            else:
                wanted.append(a)
        for uid, (_, tloc, number) in found.items():
            if uid not in seen:
                skip(tloc, f"line {number}: transcript line for {uid} has no audio file", "no_audio")

    # 3. Headers (for S3: download to the cache first).
    local_audio = source.materialise(subset, wanted, cache_dir)
    kept_at: dict[str, str] = {}
    for a in wanted:
        loc, uid = source.location(subset, a.rel), _stem(a.rel)
        if uid in kept_at:  # the same id in two folders: ids must be unique downstream
            skip(loc, f"duplicate utterance id {uid} (also {kept_at[uid]})", "duplicate")
            continue
        local = local_audio[a.rel]
        try:
            if isinstance(local, CorpusError):
                raise AudioError(loc, f"cannot fetch ({local})")
            info = read_info(local)
        except AudioError as exc:
            skip(loc, exc.reason, "bad_audio")
            continue
        kept_at[uid] = loc
        text = lines[posixpath.dirname(a.rel)][uid][0]
        utterances.append(Utterance(
            id=uid, path=loc, duration=info.duration, text=text, speaker=_speaker(uid, a.rel)
        ))
    utterances.sort(key=lambda u: u.path)
    skipped.sort(key=lambda s: s.path)
    return utterances, skipped
