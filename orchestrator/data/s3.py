"""S3 corpora: a download cache and an upload, on top of the one S3 layer (:mod:`orchestrator.s3`).

URIs, the client, listings and error translation live in :mod:`orchestrator.s3` (re-exported
here for the corpus readers); every failure is one :class:`~orchestrator.s3.S3Error` line (a
``CorpusError``) naming the bucket and the variables to check.

Cache layout: ``<cache_dir>/<bucket>/<key dirs>/<stem>.<tag><suffix>`` where ``tag`` hashes
the object's ETag and size, so a changed object is fetched again and an unchanged one never
is. Downloads go to a temporary file in the same folder and are renamed into place, so a
reader never sees a partial file, even with several Ray workers sharing the cache.
"""

from __future__ import annotations

import glob
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from orchestrator.data.errors import CorpusError
from orchestrator.fileio import atomic_output
from orchestrator.s3 import (  # noqa: F401 - re-exported: the corpus readers' S3 vocabulary
    S3_SCHEME,
    S3BucketNotFound,
    S3Error,
    S3NotFoundError,
    S3Object,
    call,
    describe_endpoint,
    endpoint_url,
    get_client,
    is_s3_uri,
    join_s3_uri,
    list_folders,
    list_objects,
    prefix_exists,
    s3_error,
    split_s3_uri,
    upload_file,
)
from orchestrator.s3 import ensure_bucket as _ensure_bucket


# Objects below this size are uploaded in one part, so their ETag is their MD5 and unchanged
# files can be recognised without downloading them.
MULTIPART_THRESHOLD = 256 * 1024 * 1024


# -- download cache ---------------------------------------------------------------------------


def _key_parts(key: str) -> tuple[list[str], str, str]:
    """(folders, stem, suffix) of a key, safe to use as a local path under the cache."""
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        # Keys like "a//b" or "../x" must not escape or collide in the cache folder.
        digest = hashlib.sha1(key.encode()).hexdigest()
        name = PurePosixPath(parts[-1] or "object")
        return ["_odd_keys", digest[:2]], f"{digest}-{name.stem}", name.suffix
    name = PurePosixPath(parts[-1])
    return parts[:-1], name.stem, name.suffix


def _tag(etag: str, size: int) -> str:
    return hashlib.sha1(f"{etag}:{size}".encode()).hexdigest()[:12]


def cached_path(cache_dir: str | os.PathLike, bucket: str, key: str, etag: str, size: int) -> Path:
    """Where the object ``bucket/key`` with this ETag and size lives in the cache."""
    folders, stem, suffix = _key_parts(key)
    return Path(cache_dir, bucket, *folders, f"{stem}.{_tag(etag, size)}{suffix}")


def _cached_versions(cache_dir: str | os.PathLike, bucket: str, key: str) -> list[Path]:
    folders, stem, suffix = _key_parts(key)
    pattern = os.path.join(
        glob.escape(str(Path(cache_dir, bucket, *folders))), f"{glob.escape(stem)}.{'[0-9a-f]' * 12}"
    ) + glob.escape(suffix)
    return [Path(p) for p in glob.glob(pattern)]


def fetch(
    uri: str,
    *,
    cache_dir: str | os.PathLike,
    etag: str | None = None,
    size: int | None = None,
) -> Path:
    """A local copy of the object ``uri``, downloaded once into ``cache_dir``.

    With ``etag`` and ``size`` (from a listing) the cached copy is used only when it is that
    version; without them, any cached version is used (the manifest build refreshes changed
    objects), and a missing one is downloaded.

    Raises:
        CorpusError: the object cannot be read (missing, access denied, endpoint down).
    """
    bucket, key = split_s3_uri(uri)
    if etag is not None and size is not None:
        path = cached_path(cache_dir, bucket, key, etag, size)
        if path.is_file() and path.stat().st_size == size:
            return path
    else:
        versions = _cached_versions(cache_dir, bucket, key)
        try:
            if versions:
                return max(versions, key=lambda p: p.stat().st_mtime_ns)
        except FileNotFoundError:  # pruned by a concurrent download of a newer version
            pass
    return _download(uri, bucket, key, cache_dir)


def _download(uri: str, bucket: str, key: str, cache_dir: str | os.PathLike) -> Path:
    reply = call(uri, "download", get_client().get_object, Bucket=bucket, Key=key)
    etag = reply["ETag"].strip('"')
    size = int(reply["ContentLength"])
    path = cached_path(cache_dir, bucket, key, etag, size)
    written = 0
    with atomic_output(path) as tmp, open(tmp, "wb") as out:
        try:
            for chunk in reply["Body"].iter_chunks(1 << 20):
                out.write(chunk)
                written += len(chunk)
        except Exception as exc:
            raise s3_error(exc, uri, "download") from None
        if written != size:
            raise S3Error(
                f"download of {uri} was cut short ({written} of {size} bytes): retry; if it "
                "persists check the S3 server at AWS_ENDPOINT_URL"
            )
    for old in _cached_versions(cache_dir, bucket, key):
        if old != path:  # an older version of the same key: no longer needed
            old.unlink(missing_ok=True)
    return path


# -- upload -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadReport:
    """What ``upload_directory`` did: files uploaded, files already there, bytes sent."""

    uploaded: int
    unchanged: int
    bytes_sent: int


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_bucket(bucket: str, *, create: bool) -> None:
    """Check that ``bucket`` exists; create it when ``create`` is true."""
    _ensure_bucket(bucket, create=create, hint=" (upload --create-bucket does)")


def upload_directory(
    local_dir: str | os.PathLike,
    uri: str,
    *,
    create_bucket: bool = False,
    workers: int = 8,
) -> UploadReport:
    """Upload every file under ``local_dir`` to ``uri`` (``s3://bucket/prefix``), keeping the layout.

    ``local_dir/a/b.flac`` becomes ``s3://bucket/prefix/a/b.flac``. Files already there with
    the same size and MD5 are not sent again, so an interrupted upload can simply be rerun.

    Raises:
        CorpusError: ``local_dir`` is not a folder, or S3 refuses (see ``s3_error``).
    """
    root = Path(local_dir)
    if not root.is_dir():
        raise CorpusError(f"cannot upload {root}: it is not a folder; pass the corpus root folder")
    bucket, prefix = split_s3_uri(uri)
    prefix = prefix.strip("/")
    key_prefix = f"{prefix}/" if prefix else ""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if not files:
        raise CorpusError(f"nothing to upload: {root} holds no files; pass the corpus root folder")
    ensure_bucket(bucket, create=create_bucket)
    existing = {o.key: o for o in list_objects(bucket, key_prefix)}
    todo: list[tuple[Path, str]] = []
    unchanged = 0
    for path in files:
        key = key_prefix + path.relative_to(root).as_posix()
        there = existing.get(key)
        if there and there.size == path.stat().st_size and there.etag == _md5(path):
            unchanged += 1
        else:
            todo.append((path, key))

    from boto3.s3.transfer import TransferConfig

    transfer = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, use_threads=False)

    def send(item: tuple[Path, str]) -> int:
        path, key = item
        upload_file(path, bucket, key, Config=transfer)
        return path.stat().st_size

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        sent = sum(pool.map(send, todo))
    return UploadReport(uploaded=len(todo), unchanged=unchanged, bytes_sent=sent)
