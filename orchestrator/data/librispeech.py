"""LibriSpeech-layout corpus reader: manifests from file headers, audio, local or S3 roots.

Usage:
    python -m orchestrator.data.librispeech manifest /data/LibriSpeech dev-clean
    python -m orchestrator.data.librispeech manifest /data/LibriSpeech train-clean-100 \\
        --min-duration 2 --max-duration 60
    python -m orchestrator.data.librispeech upload runs/synthetic s3://my-bucket/synthetic \\
        --create-bucket
    AWS_ENDPOINT_URL=http://127.0.0.1:9000 AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... \\
        python -m orchestrator.data.librispeech manifest s3://my-bucket/synthetic train

Layout (root is a folder or ``s3://bucket/prefix``)::

    <root>/<subset>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac   (.wav/.ogg/.mp3 too)
    <root>/<subset>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt     lines "<utt-id> TEXT"

A manifest lists every usable utterance with its duration (read from the file header; only the
last samples are decoded, to find truncated files), transcript and speaker. It is built once
and cached as JSON under ``<cache_dir>/manifests/``; a fingerprint of the corpus files (names, sizes, mtimes or ETags)
is checked on every load and the manifest is rebuilt when the corpus changed. S3 objects are
downloaded once into ``<cache_dir>/s3/`` (see ``orchestrator.data.s3``).

Bad data never crashes a build and is never silent: corrupt, empty or unreadable audio, audio
without a transcript line, transcript lines without audio, empty and duplicate lines are
skipped, listed in ``Manifest.skipped`` (path, reason, kind) and summarised in one warning.
Listing the files (local or S3) and matching transcripts to audio is ``librispeech_files.py``;
this module builds, caches and filters the manifest, and holds the command line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from orchestrator.data import s3
from orchestrator.data.audio import default_cache_dir, load_audio, s3_cache_dir
from orchestrator.data.errors import CorpusError
from orchestrator.data.librispeech_files import (
    LAYOUT,
    CorpusFile,
    Skipped,
    Source,
    match_subset,
    open_source,
    subset_exists,
)
from orchestrator.data.s3 import is_s3_uri, split_s3_uri, upload_directory
from orchestrator.data.types import Utterance
from orchestrator.errors import cli_main, configure_logging
from orchestrator.fileio import atomic_write_text

__all__ = [
    "CorpusError",
    "Manifest",
    "Skipped",
    "default_cache_dir",
    "is_s3_uri",
    "list_subsets",
    "load_audio",
    "load_manifest",
    "split_s3_uri",
    "upload_corpus",
]

log = logging.getLogger(__name__)

MANIFEST_VERSION = 2  # 2: audio whose last samples do not decode is skipped
MAX_LOGGED_SKIPS = 50


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """The usable utterances of one subset, and what was left out.

    Attributes:
        root: the corpus root as given (normalised).
        subset: the subset name, e.g. ``train-clean-100``.
        utterances: kept utterances, ordered by path.
        skipped: bad data that was left out (each with its path and reason).
        too_short: utterances removed by ``min_duration``.
        too_long: utterances removed by ``max_duration``.
        fingerprint: hash of the corpus files the manifest was built from.
        cache_path: the cached manifest file, or None if it could not be written.
        from_cache: True when the manifest was read from the cache, not rebuilt.
    """

    root: str
    subset: str
    utterances: list[Utterance]
    skipped: list[Skipped] = field(default_factory=list)
    too_short: int = 0
    too_long: int = 0
    fingerprint: str = ""
    cache_path: str | None = None
    from_cache: bool = False

    @property
    def total_seconds(self) -> float:
        """Total audio of the kept utterances, in seconds."""
        return sum(u.duration for u in self.utterances)

    @property
    def speakers(self) -> list[str]:
        """Distinct speakers of the kept utterances, sorted."""
        return sorted({u.speaker for u in self.utterances})

    def skipped_counts(self) -> dict[str, int]:
        """Number of skipped items per kind."""
        return dict(sorted(Counter(s.kind for s in self.skipped).items()))

    def summary(self) -> str:
        """One line: counts of kept, skipped and filtered utterances."""
        parts = [
            f"{self.root} {self.subset}: {len(self.utterances)} utterances",
            f"{self.total_seconds / 3600:.2f} h",
            f"{len(self.speakers)} speakers",
        ]
        if self.skipped:
            kinds = ", ".join(f"{k} {n}" for k, n in self.skipped_counts().items())
            parts.append(f"{len(self.skipped)} skipped ({kinds})")
        if self.too_short or self.too_long:
            parts.append(f"duration filter removed {self.too_short} too short, {self.too_long} too long")
        return ", ".join(parts)


# -- the manifest cache -------------------------------------------------------------------------


def _fingerprint(files: list[CorpusFile]) -> str:
    digest = hashlib.sha256(f"v{MANIFEST_VERSION}\n".encode())
    for f in files:
        digest.update(f"{f.rel}\t{f.size}\t{f.stamp}\t{f.error or ''}\n".encode())
    return digest.hexdigest()


def _manifest_path(cache_dir: Path, source: Source, subset: str) -> Path:
    digest = hashlib.sha256(f"{source.identity}|{subset}".encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in subset)
    return cache_dir / "manifests" / f"{safe}-{digest}.json"


def _read_cache(path: Path, fingerprint: str):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("version") != MANIFEST_VERSION or data.get("fingerprint") != fingerprint:
            return None
        utterances = [Utterance(**u) for u in data["utterances"]]
        skipped = [Skipped(**s) for s in data["skipped"]]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        log.info("manifest cache %s is unreadable (%s): rebuilding it", path, exc)
        return None
    return utterances, skipped


def _to_json(data: dict) -> str:
    """JSON with one utterance or skipped item per line, so the file reads (and diffs) well."""
    head = {k: v for k, v in data.items() if not isinstance(v, list)}
    body = [json.dumps(head, ensure_ascii=False)[:-1]]
    for key, items in ((k, v) for k, v in data.items() if isinstance(v, list)):
        rows = ",\n".join(json.dumps(item, ensure_ascii=False) for item in items)
        body.append(f'"{key}": [\n{rows}\n]' if rows else f'"{key}": []')
    return ",\n".join(body) + "}\n"


def _write_cache(path: Path, data: dict) -> bool:
    try:
        atomic_write_text(path, _to_json(data))
    except OSError as exc:
        log.warning(
            "cannot write the manifest cache %s (%s): the manifest will be rebuilt on every load; "
            "pass cache_dir or set POM_ABLATIONS_CACHE to a writable folder", path, exc
        )
        return False
    return True


def _check_subset(subset: str) -> str:
    name = str(subset).strip("/")
    if not name or any(p in ("", ".", "..") for p in name.split("/")):
        raise CorpusError(f"bad subset name {subset!r}: pass a folder name such as train-clean-100")
    return name


def _check_filter(min_duration: float | None, max_duration: float | None) -> None:
    for name, value in (("min_duration", min_duration), ("max_duration", max_duration)):
        if value is not None and not value >= 0:
            raise CorpusError(f"{name} must be a number of seconds >= 0, got {value!r}")
    if min_duration is not None and max_duration is not None and min_duration > max_duration:
        raise CorpusError(
            f"min_duration {min_duration} s is above max_duration {max_duration} s: swap or fix them"
        )


def _skipped_warning(where: str, skipped: list[Skipped], total: int, cache_path: str | None) -> str:
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(Counter(s.kind for s in skipped).items()))
    lines = [f"{where}: skipped {len(skipped)} bad item(s) ({kinds}); {total} utterances kept:"]
    lines += [f"  {s.path}: {s.reason}" for s in skipped[:MAX_LOGGED_SKIPS]]
    if len(skipped) > MAX_LOGGED_SKIPS:
        rest = f" and in {cache_path}" if cache_path else ""
        lines.append(f"  ... {len(skipped) - MAX_LOGGED_SKIPS} more (all in Manifest.skipped{rest})")
    return "\n".join(lines)


def list_subsets(root: str | os.PathLike) -> list[str]:
    """Names of the subsets under ``root`` (local folders holding corpus files, or S3 folders)."""
    return open_source(root).subsets()


def load_manifest(
    root: str | os.PathLike,
    subset: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    min_duration: float | None = None,
    max_duration: float | None = None,
) -> Manifest:
    """The manifest of one subset, from the cache when the corpus has not changed.

    Args:
        root: corpus root: a local folder or ``s3://bucket/prefix``.
        subset: subset folder name, e.g. ``train-clean-100``.
        cache_dir: cache root (manifests and S3 objects); default ``default_cache_dir()``.
        min_duration: drop utterances shorter than this many seconds (the paper: 2).
        max_duration: drop utterances longer than this many seconds (the paper: 60).

    Returns:
        The manifest; bad data is in ``skipped`` and summarised in one logging warning.

    Raises:
        CorpusError: missing root or subset (the message lists the existing subsets), S3
            access problems, a subset with no usable utterance, or a duration filter that
            removes everything.
    """
    _check_filter(min_duration, max_duration)
    subset = _check_subset(subset)
    cache = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()).absolute()
    source = open_source(root)
    files = source.list_files(subset)
    if not files:
        others = [s for s in source.subsets() if s != subset]
        existing = (
            f"existing subsets: {', '.join(others)}" if others else f"no subsets found (expected {LAYOUT})"
        )
        problem = "holds no audio or transcript files" if subset_exists(source, subset) else "not found"
        raise CorpusError(f"subset '{subset}' {problem} in {source.label}: {existing}")

    fingerprint = _fingerprint(files)
    cache_path = _manifest_path(cache, source, subset)
    cached = _read_cache(cache_path, fingerprint)
    from_cache = cached is not None
    if cached is None:
        utterances, skipped = match_subset(source, subset, files, s3_cache_dir(cache))
        written = _write_cache(cache_path, {
            "version": MANIFEST_VERSION,
            "root": source.label,
            "subset": subset,
            "fingerprint": fingerprint,
            "utterances": [asdict(u) for u in utterances],
            "skipped": [asdict(s) for s in skipped],
        })
        log.info("built manifest of %s/%s: %d utterances -> %s",
                 source.label, subset, len(utterances), cache_path)
    else:
        utterances, skipped = cached
        written = True
    where = f"{source.label}/{subset}"
    saved = str(cache_path) if written else None
    if skipped:
        log.warning(_skipped_warning(where, skipped, len(utterances), saved))
    if not utterances:
        first = f" (first: {skipped[0].path}: {skipped[0].reason})" if skipped else ""
        raise CorpusError(
            f"subset {where} has no usable utterance: all {len(skipped)} item(s) were skipped{first}: "
            "fix or replace the files"
        )

    kept = [
        u for u in utterances
        if (min_duration is None or u.duration >= min_duration)
        and (max_duration is None or u.duration <= max_duration)
    ]
    too_short = sum(1 for u in utterances if min_duration is not None and u.duration < min_duration)
    too_long = len(utterances) - len(kept) - too_short
    if not kept:
        shortest = min(u.duration for u in utterances)
        longest = max(u.duration for u in utterances)
        raise CorpusError(
            f"the duration filter [{min_duration}, {max_duration}] s removes all {len(utterances)} "
            f"utterances of {where} (they last {shortest:.2f} to {longest:.2f} s): widen "
            "min_duration / max_duration"
        )
    if too_short or too_long:
        log.info(
            "%s: duration filter [%s, %s] s removed %d shorter and %d longer utterances",
            where, min_duration, max_duration, too_short, too_long,
        )
    return Manifest(
        root=source.label,
        subset=subset,
        utterances=kept,
        skipped=skipped,
        too_short=too_short,
        too_long=too_long,
        fingerprint=fingerprint,
        cache_path=saved,
        from_cache=from_cache,
    )


def upload_corpus(
    local_root: str | os.PathLike,
    uri: str,
    *,
    create_bucket: bool = False,
    workers: int = 8,
) -> s3.UploadReport:
    """Upload a local corpus folder to ``s3://bucket/prefix``, keeping its layout.

    ``local_root/<subset>/...`` becomes ``s3://bucket/prefix/<subset>/...``; files already
    there (same size and MD5) are not sent again.

    Raises:
        CorpusError: ``local_root`` is not a folder, or S3 refuses (one line, see ``s3``).
    """
    return upload_directory(local_root, uri, create_bucket=create_bucket, workers=workers)


# -- command line --------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.data.librispeech",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[1],  # the Usage block
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    m = commands.add_parser("manifest", help="build (or read) a subset's manifest and print its counts")
    m.add_argument("root", help="corpus root: a folder or s3://bucket/prefix")
    m.add_argument("subset", help="subset folder, e.g. dev-clean")
    m.add_argument("--cache-dir", default=None, help=f"cache root (default {default_cache_dir()})")
    m.add_argument("--min-duration", type=float, default=None, help="drop shorter utterances (s)")
    m.add_argument("--max-duration", type=float, default=None, help="drop longer utterances (s)")
    u = commands.add_parser("upload", help="upload a local corpus folder to s3://bucket/prefix")
    u.add_argument("local", help="local corpus root folder")
    u.add_argument("uri", help="destination s3://bucket/prefix")
    u.add_argument("--create-bucket", action="store_true", help="create the bucket if it does not exist")
    u.add_argument("--workers", type=int, default=8, help="parallel uploads (default 8)")
    args = parser.parse_args(argv)
    configure_logging(quiet=True)

    def body() -> int:
        if args.command == "manifest":
            manifest = load_manifest(
                args.root, args.subset, cache_dir=args.cache_dir,
                min_duration=args.min_duration, max_duration=args.max_duration,
            )
            print(f"corpus: {manifest.root} subset {manifest.subset}")
            print(f"utterances: {len(manifest.utterances)} ({manifest.total_seconds / 3600:.3f} h, "
                  f"{len(manifest.speakers)} speakers)")
            kinds = ", ".join(f"{k} {n}" for k, n in manifest.skipped_counts().items())
            print(f"skipped: {len(manifest.skipped)}" + (f" ({kinds})" if kinds else ""))
            print(f"duration filter: {manifest.too_short} too short, {manifest.too_long} too long")
            state = "read from cache" if manifest.from_cache else "built"
            print(f"manifest: {manifest.cache_path or '(not cached)'} ({state})")
        else:
            if not is_s3_uri(args.uri):
                raise CorpusError(f"upload destination {args.uri!r} is not an S3 URI: write s3://bucket/prefix")
            report = upload_corpus(
                args.local, args.uri, create_bucket=args.create_bucket, workers=args.workers
            )
            print(f"uploaded {report.uploaded} file(s) ({report.bytes_sent / 1e6:.1f} MB) to {args.uri}; "
                  f"{report.unchanged} already there")
        return 0

    try:
        return cli_main(body)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
