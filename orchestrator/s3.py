"""The project's one S3 layer: URIs, the client, error translation and the object operations.

The corpus reader (:mod:`orchestrator.data.s3`, a download cache and an upload), the sweep
storage (:mod:`orchestrator.storage`) and the preflight all go through this module, so there is
one client factory, one set of timeouts and one translation of botocore errors into a
:class:`S3Error` line for people. Ray Tune / Train get the same endpoint through
:func:`arrow_filesystem`.

Any S3-compatible server works: the client honours ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL`` and the standard credential variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, ``AWS_DEFAULT_REGION``).
Timeouts are short and retries few, so a dead endpoint fails in seconds.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.data.errors import CorpusError
from orchestrator.fileio import atomic_output

S3_SCHEME = "s3://"
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 60.0
TOTAL_MAX_ATTEMPTS = 2  # the first try and one retry: a dead endpoint fails in seconds
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
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
_CONDITION_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict"}


class S3Error(CorpusError):
    """S3 cannot be used for what was asked; the one-line message names the URI and the fix."""


class S3NotFoundError(S3Error):
    """The bucket or the object named in the message does not exist."""


class S3BucketNotFound(S3NotFoundError):
    """The bucket named in the message does not exist."""


class S3ConditionFailed(S3Error):
    """A conditional write lost: the object exists already (``if_none_match``)."""


def is_s3_uri(value: object) -> bool:
    """True when ``value`` is a string of the form ``s3://...``."""
    return isinstance(value, str) and value.startswith(S3_SCHEME)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/some/key`` into ``("bucket", "some/key")``.

    The key may be empty (``s3://bucket`` or ``s3://bucket/``); a trailing slash is kept, so
    ``s3://b/prefix/`` gives ``("b", "prefix/")``.

    Raises:
        S3Error: ``uri`` is not an ``s3://`` URI or names no bucket.
    """
    if not is_s3_uri(uri):
        raise S3Error(f"not an S3 URI: {uri!r}: write it as s3://bucket/prefix")
    bucket, _, key = uri[len(S3_SCHEME):].partition("/")
    if not bucket:
        raise S3Error(f"S3 URI {uri!r} names no bucket: write it as s3://bucket/prefix")
    return bucket, key


def join_s3_uri(bucket: str, key: str) -> str:
    """Inverse of :func:`split_s3_uri`."""
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


def error_code(exc: Exception) -> str:
    """The S3 error code of a botocore ``ClientError`` (``""`` for other exceptions)."""
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def s3_error(exc: Exception, uri: str, action: str) -> S3Error:
    """Translate an exception of a boto3 call into one :class:`S3Error` line.

    Args:
        exc: the exception raised by a boto3 call.
        uri: the ``s3://`` URI the call was about.
        action: what was being done, e.g. ``"list"`` or ``"download"``.
    """
    from botocore import exceptions as bx

    bucket = split_s3_uri(uri)[0] if is_s3_uri(uri) else uri
    if isinstance(exc, S3Error):
        return exc
    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return S3Error(f"no AWS credentials to {action} {uri} (bucket '{bucket}'): set {CREDENTIAL_VARS}")
    if isinstance(exc, bx.SSLError):
        return S3Error(
            f"TLS error reaching {describe_endpoint()} for bucket '{bucket}': {exc}: check "
            "AWS_ENDPOINT_URL (http:// vs https://) and AWS_CA_BUNDLE"
        )
    if isinstance(exc, (bx.ConnectionError, bx.HTTPClientError)):
        return S3Error(
            f"cannot reach {describe_endpoint()} to {action} {uri} (bucket '{bucket}'): "
            f"{type(exc).__name__}: check AWS_ENDPOINT_URL and that the S3 server is running and reachable"
        )
    if isinstance(exc, bx.ClientError):
        code = error_code(exc) or "?"
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket" or (code == "404" and action == "open bucket"):
            return S3BucketNotFound(
                f"S3 bucket '{bucket}' does not exist at {describe_endpoint()}: check the URI {uri} and "
                "AWS_ENDPOINT_URL, or create the bucket"
            )
        if code in _AUTH_CODES or status == 403:
            return S3Error(
                f"S3 refused to {action} {uri} (bucket '{bucket}', {code}) at {describe_endpoint()}: "
                f"check {CREDENTIAL_VARS} and the bucket's permissions"
            )
        if code in _MISSING_CODES or status == 404:
            return S3NotFoundError(f"S3 object {uri} does not exist ({code}) at {describe_endpoint()}")
        if code in _CONDITION_CODES or status == 412:
            return S3ConditionFailed(f"S3 object {uri} exists already ({code}): it was written concurrently")
        message = " ".join(str(exc.response.get("Error", {}).get("Message", "")).split())
        return S3Error(f"S3 error {code} while trying to {action} {uri} at {describe_endpoint()}: {message}")
    if isinstance(exc, bx.BotoCoreError):
        return S3Error(f"S3 client error while trying to {action} {uri} at {describe_endpoint()}: {exc}")
    return S3Error(f"cannot {action} {uri}: {type(exc).__name__}: {exc}")


def call(uri: str, action: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
    """``fn(**kwargs)`` (a boto3 call) with its errors translated by :func:`s3_error`."""
    from botocore import exceptions as bx

    try:
        return fn(**kwargs)
    except (bx.BotoCoreError, bx.ClientError) as exc:
        raise s3_error(exc, uri, action) from None


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


def list_objects(bucket: str, prefix: str) -> list[S3Object]:
    """Every object whose key starts with ``prefix``, in key order."""
    uri = join_s3_uri(bucket, prefix)
    pages = call(uri, "list", get_client().get_paginator("list_objects_v2").paginate, Bucket=bucket, Prefix=prefix)
    return [
        S3Object(item["Key"], int(item["Size"]), item["ETag"].strip('"'))
        for page in _iterate(uri, pages)
        for item in page.get("Contents", [])
    ]


def list_folders(bucket: str, prefix: str) -> list[str]:
    """Names of the immediate "sub-folders" under ``prefix`` (which should end with ``/``)."""
    uri = join_s3_uri(bucket, prefix)
    paginator = get_client().get_paginator("list_objects_v2")
    pages = call(uri, "list", paginator.paginate, Bucket=bucket, Prefix=prefix, Delimiter="/")
    names = [item["Prefix"][len(prefix):].rstrip("/") for page in _iterate(uri, pages)
             for item in page.get("CommonPrefixes", [])]
    return sorted(n for n in names if n)


def prefix_exists(bucket: str, prefix: str) -> bool:
    """True when at least one object's key starts with ``prefix``."""
    uri = join_s3_uri(bucket, prefix)
    reply = call(uri, "list", get_client().list_objects_v2, Bucket=bucket, Prefix=prefix, MaxKeys=1)
    return bool(reply.get("KeyCount", 0) or reply.get("Contents"))


def object_exists(bucket: str, key: str) -> bool:
    """True when the object ``bucket/key`` exists."""
    try:
        call(join_s3_uri(bucket, key), "read", get_client().head_object, Bucket=bucket, Key=key)
        return True
    except S3BucketNotFound:
        raise
    except S3NotFoundError:
        return False


def get_bytes(bucket: str, key: str) -> bytes | None:
    """The content of ``bucket/key``, or ``None`` when there is no such object."""
    uri = join_s3_uri(bucket, key)
    try:
        reply = call(uri, "read", get_client().get_object, Bucket=bucket, Key=key)
    except S3BucketNotFound:
        raise
    except S3NotFoundError:
        return None
    return call(uri, "read", reply["Body"].read)


def put_bytes(bucket: str, key: str, data: bytes, *, if_none_match: bool = False) -> None:
    """Write ``bucket/key`` in one PUT (S3 shows it only when complete).

    With ``if_none_match`` the write fails with :class:`S3ConditionFailed` when the object
    exists (S3 conditional writes); servers without conditional writes write unconditionally.
    """
    uri = join_s3_uri(bucket, key)
    client = get_client()
    if if_none_match:
        try:
            call(uri, "write", client.put_object, Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            return
        except S3ConditionFailed:
            raise
        except S3Error as err:
            if "NotImplemented" not in str(err):
                raise
    call(uri, "write", client.put_object, Bucket=bucket, Key=key, Body=data)


def delete_object(bucket: str, key: str) -> None:
    call(join_s3_uri(bucket, key), "delete", get_client().delete_object, Bucket=bucket, Key=key)


def upload_file(path: str | os.PathLike, bucket: str, key: str, **kwargs: Any) -> None:
    """Upload a local file (in parts when large; S3 shows the object only once it is complete)."""
    call(join_s3_uri(bucket, key), "upload", get_client().upload_file,
         Filename=str(path), Bucket=bucket, Key=key, **kwargs)


def download_file(bucket: str, key: str, path: str | os.PathLike, *, size: int | None = None) -> Path:
    """Download ``bucket/key`` to ``path`` atomically; with ``size``, a short download is refused."""
    uri = join_s3_uri(bucket, key)
    with atomic_output(path) as tmp:
        call(uri, "download", get_client().download_file, Bucket=bucket, Key=key, Filename=str(tmp))
        got = os.path.getsize(tmp)
        if size is not None and got != size:
            raise S3Error(f"download of {uri} was cut short ({got} of {size} bytes): retry; if it persists check "
                          "the S3 server at AWS_ENDPOINT_URL")
    return Path(path)


def ensure_bucket(bucket: str, *, create: bool, hint: str = "") -> None:
    """Check that ``bucket`` exists; create it when ``create`` is true (else ``hint`` is added)."""
    client = get_client()
    uri = join_s3_uri(bucket, "")
    try:
        call(uri, "open bucket", client.head_bucket, Bucket=bucket)
        return
    except S3NotFoundError as error:
        if not create:
            raise S3NotFoundError(f"{error}{hint}") from None
    region = client.meta.region_name
    kwargs: dict[str, Any] = {"Bucket": bucket}
    if region and region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    call(uri, "create bucket", client.create_bucket, **kwargs)
    logging.getLogger(__name__).info("created S3 bucket %s", bucket)


def arrow_filesystem():
    """A ``pyarrow.fs.S3FileSystem`` for the S3 server in the environment (Ray Tune / Train storage).

    The endpoint and region are passed; the keys are not (pyarrow reads ``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY`` itself on every node), so a pickled filesystem holds no secret.
    """
    from urllib.parse import urlparse

    import pyarrow.fs

    kwargs: dict[str, Any] = {
        "region": os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
    }
    url = endpoint_url()
    if url:
        parsed = urlparse(url if "://" in url else f"https://{url}")
        kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        kwargs["scheme"] = parsed.scheme or "https"
    return pyarrow.fs.S3FileSystem(**kwargs)
