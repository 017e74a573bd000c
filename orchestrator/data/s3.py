"""S3 storage for corpora: URIs, one shared client, listing, a download cache, and upload.

Any S3-compatible server works: the client honours ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL`` and the standard credential variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, ``AWS_DEFAULT_REGION``).
Timeouts are short and retries few, so a dead endpoint fails in seconds, and every botocore
error is translated into one ``CorpusError`` line naming the bucket and the variables to check.

Cache layout: ``<cache_dir>/<bucket>/<key dirs>/<stem>.<tag><suffix>`` where ``tag`` hashes
the object's ETag and size, so a changed object is fetched again and an unchanged one never
is. Downloads go to a temporary file in the same folder and are renamed into place, so a
reader never sees a partial file, even with several Ray workers sharing the cache.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from orchestrator.data.errors import CorpusError

log = logging.getLogger(__name__)

S3_SCHEME = "s3://"
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 60.0
TOTAL_MAX_ATTEMPTS = 2  # the first try and one retry: a dead endpoint fails in seconds
# Objects below this size are uploaded in one part, so their ETag is their MD5 and unchanged
# files can be recognised without downloading them.
MULTIPART_THRESHOLD = 256 * 1024 * 1024
CREDENTIAL_VARS = "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN or AWS_PROFILE)"
_ENV_KEYS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)
_AUTH_CODES = {
    "AccessDenied",
    "AllAccessDisabled",
    "AuthorizationHeaderMalformed",
    "ExpiredToken",
    "InvalidAccessKeyId",
    "InvalidToken",
    "SignatureDoesNotMatch",
    "TokenRefreshRequired",
    "403",
}


class S3NotFoundError(CorpusError):
    """The bucket or the object named in the message does not exist."""


def is_s3_uri(value: object) -> bool:
    """True when ``value`` is a string of the form ``s3://...``."""
    return isinstance(value, str) and value.startswith(S3_SCHEME)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/some/key`` into ``("bucket", "some/key")``.

    The key may be empty (``s3://bucket`` or ``s3://bucket/``); a trailing slash is kept, so
    ``s3://b/prefix/`` gives ``("b", "prefix/")``.

    Raises:
        CorpusError: ``uri`` is not an ``s3://`` URI or names no bucket.
    """
    if not is_s3_uri(uri):
        raise CorpusError(f"not an S3 URI: {uri!r}: write it as s3://bucket/prefix")
    bucket, _, key = uri[len(S3_SCHEME):].partition("/")
    if not bucket:
        raise CorpusError(f"S3 URI {uri!r} names no bucket: write it as s3://bucket/prefix")
    return bucket, key


def join_s3_uri(bucket: str, key: str) -> str:
    """Inverse of ``split_s3_uri``."""
    return f"{S3_SCHEME}{bucket}/{key}"


@dataclass(frozen=True)
class S3Object:
    """One listed object: its key, its size in bytes and its ETag (without quotes)."""

    key: str
    size: int
    etag: str


def endpoint_url() -> str | None:
    """The S3 endpoint from the environment, or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def describe_endpoint() -> str:
    """Where S3 requests go, for messages."""
    url = endpoint_url()
    return f"endpoint {url} (AWS_ENDPOINT_URL)" if url else "AWS S3 (AWS_ENDPOINT_URL is not set)"


_clients: dict[tuple[str | None, ...], Any] = {}
_clients_lock = threading.Lock()


def get_client() -> Any:
    """The boto3 S3 client for the current environment, created once per distinct setting.

    The client is keyed by the AWS_* variables, so a changed endpoint or credential gets a new
    client; boto3 clients are thread-safe, so download threads share one.
    """
    env = tuple(os.environ.get(k) for k in _ENV_KEYS)
    with _clients_lock:
        client = _clients.get(env)
        if client is None:
            import boto3
            from botocore.config import Config

            url = endpoint_url()
            config = Config(
                connect_timeout=CONNECT_TIMEOUT_S,
                read_timeout=READ_TIMEOUT_S,
                retries={"total_max_attempts": TOTAL_MAX_ATTEMPTS, "mode": "standard"},
                max_pool_connections=32,
                # S3-compatible servers on a host:port rarely resolve bucket sub-domains.
                s3={"addressing_style": "path"} if url else None,
            )
            client = boto3.session.Session().client("s3", endpoint_url=url, config=config)
            _clients[env] = client
        return client


def s3_error(exc: Exception, uri: str, action: str) -> CorpusError:
    """Translate a botocore exception into one ``CorpusError`` line.

    Args:
        exc: the exception raised by a boto3 call.
        uri: the ``s3://`` URI the call was about.
        action: what was being done, e.g. ``"list"`` or ``"download"``.
    """
    from botocore import exceptions as bx

    bucket = split_s3_uri(uri)[0] if is_s3_uri(uri) else uri
    if isinstance(exc, CorpusError):
        return exc
    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return CorpusError(
            f"no AWS credentials to {action} {uri} (bucket '{bucket}'): set {CREDENTIAL_VARS}"
        )
    if isinstance(exc, bx.SSLError):
        return CorpusError(
            f"TLS error reaching {describe_endpoint()} for bucket '{bucket}': {exc}: check "
            "AWS_ENDPOINT_URL (http:// vs https://) and AWS_CA_BUNDLE"
        )
    if isinstance(exc, (bx.ConnectionError, bx.HTTPClientError)):
        return CorpusError(
            f"cannot reach {describe_endpoint()} to {action} {uri} (bucket '{bucket}'): "
            f"{type(exc).__name__}: check AWS_ENDPOINT_URL and that the S3 server is running and reachable"
        )
    if isinstance(exc, bx.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "?"))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket" or (code == "404" and action == "open bucket"):
            return S3NotFoundError(
                f"S3 bucket '{bucket}' does not exist at {describe_endpoint()}: check the URI {uri} and "
                "AWS_ENDPOINT_URL, or create the bucket"
            )
        if code in _AUTH_CODES or status == 403:
            return CorpusError(
                f"S3 refused to {action} {uri} (bucket '{bucket}', {code}) at {describe_endpoint()}: "
                f"check {CREDENTIAL_VARS} and the bucket's permissions"
            )
        if code in {"NoSuchKey", "404"} or status == 404:
            return S3NotFoundError(f"S3 object {uri} does not exist ({code}) at {describe_endpoint()}")
        message = " ".join(str(error.get("Message", "")).split())
        return CorpusError(
            f"S3 error {code} while trying to {action} {uri} at {describe_endpoint()}: {message}"
        )
    if isinstance(exc, bx.BotoCoreError):
        return CorpusError(
            f"S3 client error while trying to {action} {uri} at {describe_endpoint()}: {exc}"
        )
    return CorpusError(f"cannot {action} {uri}: {type(exc).__name__}: {exc}")


def _call(uri: str, action: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
    from botocore import exceptions as bx

    try:
        return fn(**kwargs)
    except (bx.BotoCoreError, bx.ClientError) as exc:
        raise s3_error(exc, uri, action) from None


def list_objects(bucket: str, prefix: str) -> list[S3Object]:
    """Every object whose key starts with ``prefix``, in key order."""
    uri = join_s3_uri(bucket, prefix)
    paginator = get_client().get_paginator("list_objects_v2")
    objects: list[S3Object] = []
    pages = _call(uri, "list", paginator.paginate, Bucket=bucket, Prefix=prefix)
    for page in _iterate(uri, pages):
        for item in page.get("Contents", []):
            objects.append(S3Object(item["Key"], int(item["Size"]), item["ETag"].strip('"')))
    return objects


def list_folders(bucket: str, prefix: str) -> list[str]:
    """Names of the immediate "sub-folders" under ``prefix`` (which should end with ``/``)."""
    uri = join_s3_uri(bucket, prefix)
    paginator = get_client().get_paginator("list_objects_v2")
    pages = _call(uri, "list", paginator.paginate, Bucket=bucket, Prefix=prefix, Delimiter="/")
    names = []
    for page in _iterate(uri, pages):
        for item in page.get("CommonPrefixes", []):
            names.append(item["Prefix"][len(prefix):].rstrip("/"))
    return sorted(n for n in names if n)


def prefix_exists(bucket: str, prefix: str) -> bool:
    """True when at least one object's key starts with ``prefix``."""
    uri = join_s3_uri(bucket, prefix)
    reply = _call(uri, "list", get_client().list_objects_v2, Bucket=bucket, Prefix=prefix, MaxKeys=1)
    return bool(reply.get("KeyCount", 0) or reply.get("Contents"))


def _iterate(uri: str, pages: Iterable[dict]) -> Iterable[dict]:
    # Paginators call the service lazily, so errors surface while iterating.
    from botocore import exceptions as bx

    iterator = iter(pages)
    while True:
        try:
            page = next(iterator)
        except StopIteration:
            return
        except (bx.BotoCoreError, bx.ClientError) as exc:
            raise s3_error(exc, uri, "list") from None
        yield page


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
    reply = _call(uri, "download", get_client().get_object, Bucket=bucket, Key=key)
    etag = reply["ETag"].strip('"')
    size = int(reply["ContentLength"])
    path = cached_path(cache_dir, bucket, key, etag, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        written = 0
        with os.fdopen(fd, "wb") as out:
            for chunk in reply["Body"].iter_chunks(1 << 20):
                out.write(chunk)
                written += len(chunk)
        if written != size:
            raise CorpusError(
                f"download of {uri} was cut short ({written} of {size} bytes): retry; if it "
                "persists check the S3 server at AWS_ENDPOINT_URL"
            )
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, Exception) and not isinstance(exc, CorpusError):
            raise s3_error(exc, uri, "download") from None
        raise
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
    from botocore import exceptions as bx

    client = get_client()
    uri = join_s3_uri(bucket, "")
    try:
        client.head_bucket(Bucket=bucket)
        return
    except bx.ClientError as exc:
        error = s3_error(exc, uri, "open bucket")
        if not isinstance(error, S3NotFoundError):
            raise error from None
        if not create:
            raise S3NotFoundError(f"{error} (upload --create-bucket does)") from None
    except bx.BotoCoreError as exc:
        raise s3_error(exc, uri, "open bucket") from None
    region = client.meta.region_name
    kwargs: dict[str, Any] = {"Bucket": bucket}
    if region and region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    _call(uri, "create bucket", client.create_bucket, **kwargs)
    log.info("created S3 bucket %s", bucket)


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
    client = get_client()

    def send(item: tuple[Path, str]) -> int:
        path, key = item
        _call(join_s3_uri(bucket, key), "upload", client.upload_file,
              Filename=str(path), Bucket=bucket, Key=key, Config=transfer)
        return path.stat().st_size

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        sent = sum(pool.map(send, todo))
    return UploadReport(uploaded=len(todo), unchanged=unchanged, bytes_sent=sent)
