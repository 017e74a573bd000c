"""Where a sweep keeps what must survive: a local (or shared) folder, or ``s3://bucket/prefix``.

Both backends have the same methods and the same layout of relative paths (``rel``), see
:mod:`orchestrator.driver`. Code that writes files the training loops read back (checkpoints,
reports) works in :meth:`Storage.local` -- for a folder that is the storage itself, for S3 a
node-local working folder (``POM_WORK_DIR``, default ``<tmp>/pom-ablations-work``) that mirrors
the prefix -- and then publishes them:

* small records (``trial.json``, ``pretrain.done.json``, ``final_metrics.json``, ...) with
  :meth:`write_json` / :meth:`read_json` (atomic: a rename locally, one complete PUT on S3);
* checkpoints with :meth:`push_checkpoint` after the loop has written one, and
  :meth:`pull_checkpoint` before a stage starts or resumes, so a trial restarted on another
  node resumes from its newest checkpoint. On S3 a checkpoint ``<rel>/step-N/`` is its files
  followed by a ``step-N/_COMPLETE.json`` marker listing them; only checkpoints with a marker
  count, so an upload cut short is never picked up;
* Ray Tune / Ray Train storage through :meth:`ray_storage` (``storage_path`` and a
  ``pyarrow.fs.S3FileSystem`` built from the standard ``AWS_*`` variables: no key is passed
  explicitly, so none ends up in a pickled run configuration).

S3 access honours ``AWS_ENDPOINT_URL`` (any S3-compatible server), ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY`` and ``AWS_DEFAULT_REGION``; every failure is one
:class:`StorageError` line naming the URI and what to check.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from orchestrator.train.checkpoint import atomic_write_bytes, latest_checkpoint

CHECKPOINT_PREFIX = "step-"
COMPLETE_MARKER = "_COMPLETE.json"
WORK_DIR_ENV = "POM_WORK_DIR"


class StorageError(RuntimeError):
    """Storage cannot be used; the one-line message names the location and the fix."""


def _clean_rel(rel: str) -> str:
    parts = [p for p in str(rel).replace("\\", "/").split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise StorageError(f"storage path {rel!r} leaves the storage root")
    return "/".join(parts)


def _step(name: str) -> int | None:
    if name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit():
        return int(name[len(CHECKPOINT_PREFIX):])
    return None


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.is_file())


class Storage:
    """The common interface; see the module docstring."""

    uri: str
    is_remote = False

    def local(self, rel: str = "") -> Path:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self, rel: str = "") -> str:
        """The location of ``rel`` for messages (a path or an ``s3://`` URI)."""
        raise NotImplementedError

    # records ------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> Path:
        """Write ``rel`` atomically (also into the local working copy); return the local path."""
        raise NotImplementedError

    def write_json(self, rel: str, obj: Any) -> Path:
        return self.write_bytes(rel, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())

    def read_bytes(self, rel: str) -> bytes | None:
        """The content of ``rel``, or ``None`` when there is no such file."""
        raise NotImplementedError

    def read_json(self, rel: str) -> dict[str, Any] | None:
        data = self.read_bytes(rel)
        if data is None:
            return None
        try:
            return json.loads(data.decode())
        except ValueError:
            raise StorageError(f"{self.describe(rel)} is not valid JSON: delete it or restore it from a backup") from None

    def exists(self, rel: str) -> bool:
        """True when the file ``rel`` exists."""
        raise NotImplementedError

    def has_prefix(self, rel: str) -> bool:
        """True when anything is stored under the folder ``rel``."""
        raise NotImplementedError

    def list_dirs(self, rel: str) -> list[str]:
        """Names of the folders directly under ``rel`` (sorted; empty when ``rel`` is absent)."""
        raise NotImplementedError

    def push_file(self, rel: str) -> None:
        """Publish the local working copy of the file ``rel`` (written by other code)."""

    def push_dir(self, rel: str) -> None:
        """Publish every file of the local working folder ``rel``."""

    def check(self) -> None:
        """Raise :class:`StorageError` when the storage cannot be written."""

    # checkpoints --------------------------------------------------------------------------
    def checkpoint_steps(self, rel: str) -> list[int]:
        """Steps of the complete checkpoints under the checkpoint folder ``rel``, ascending."""
        raise NotImplementedError

    def push_checkpoint(self, rel: str, folder: Path, *, keep: int = 0) -> None:
        """Publish the complete local checkpoint ``folder`` (``<local(rel)>/step-N``)."""

    def pull_checkpoint(self, rel: str) -> Path | None:
        """Make the newest complete checkpoint of ``rel`` available locally; return its folder."""
        return latest_checkpoint(self.local(rel))

    # Ray ----------------------------------------------------------------------------------
    def ray_storage(self, rel: str) -> tuple[str, Any]:
        """``(storage_path, storage_filesystem)`` for Ray Tune / Ray Train ``RunConfig``."""
        raise NotImplementedError


class LocalStorage(Storage):
    """A folder (local, or shared by every node such as NFS): the working copy is the storage."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.root = Path(path).expanduser().resolve()
        self.uri = str(self.root)

    def local(self, rel: str = "") -> Path:
        rel = _clean_rel(rel)
        return self.root / rel if rel else self.root

    def describe(self, rel: str = "") -> str:
        return str(self.local(rel))

    def write_bytes(self, rel: str, data: bytes) -> Path:
        path = self.local(rel)
        atomic_write_bytes(path, data)
        return path

    def read_bytes(self, rel: str) -> bytes | None:
        try:
            return self.local(rel).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def exists(self, rel: str) -> bool:
        return self.local(rel).is_file()

    def has_prefix(self, rel: str) -> bool:
        path = self.local(rel)
        return path.exists() and (not path.is_dir() or any(path.iterdir()))

    def list_dirs(self, rel: str) -> list[str]:
        path = self.local(rel)
        return sorted(p.name for p in path.iterdir() if p.is_dir()) if path.is_dir() else []

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.root, prefix=".write-check.", delete=True)
            probe.close()
        except OSError as err:
            raise StorageError(f"storage folder {self.root} is not writable ({err.strerror}): fix storage.path") from None

    def checkpoint_steps(self, rel: str) -> list[int]:
        root = self.local(rel)
        if not root.is_dir():
            return []
        return sorted(s for p in root.iterdir() if p.is_dir() and (s := _step(p.name)) is not None and (p / "state.pt").is_file())

    def ray_storage(self, rel: str) -> tuple[str, Any]:
        return str(self.local(rel)), None


class S3Storage(Storage):
    """``s3://bucket/prefix`` with a node-local working folder; boto3 for objects."""

    is_remote = True

    def __init__(self, uri: str, *, work_dir: str | os.PathLike | None = None) -> None:
        from orchestrator.data.s3 import split_s3_uri
        from orchestrator.data.errors import CorpusError

        try:
            self.bucket, prefix = split_s3_uri(uri)
        except CorpusError as err:
            raise StorageError(str(err)) from None
        self.prefix = _clean_rel(prefix)
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        base = Path(work_dir or os.environ.get(WORK_DIR_ENV) or Path(tempfile.gettempdir()) / "pom-ablations-work")
        self.work = base.expanduser().resolve() / self.bucket / self.prefix

    # paths --------------------------------------------------------------------------------
    def key(self, rel: str = "") -> str:
        rel = _clean_rel(rel)
        return "/".join(p for p in (self.prefix, rel) if p)

    def local(self, rel: str = "") -> Path:
        rel = _clean_rel(rel)
        return self.work / rel if rel else self.work

    def describe(self, rel: str = "") -> str:
        return f"s3://{self.bucket}/{self.key(rel)}"

    # boto3 --------------------------------------------------------------------------------
    def _client(self):
        from orchestrator.data.s3 import get_client

        return get_client()

    def _error(self, exc: Exception, rel: str, action: str) -> StorageError:
        from orchestrator.data.s3 import s3_error

        text = str(s3_error(exc, self.describe(rel), action))
        text = text.replace("(upload --create-bucket does)", "")
        return StorageError(f"storage.path {self.uri}: {text}")

    def _call(self, rel: str, action: str, fn, **kwargs):
        from botocore import exceptions as bx

        try:
            return fn(**kwargs)
        except (bx.BotoCoreError, bx.ClientError) as exc:
            raise self._error(exc, rel, action) from None

    def _list(self, rel: str, *, delimiter: bool = False) -> tuple[list[dict], list[str]]:
        from botocore import exceptions as bx

        prefix = self.key(rel)
        prefix = f"{prefix}/" if prefix else ""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if delimiter:
            kwargs["Delimiter"] = "/"
        objects, folders = [], []
        try:
            for page in self._client().get_paginator("list_objects_v2").paginate(**kwargs):
                objects.extend(page.get("Contents", []))
                folders.extend(p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", []))
        except (bx.BotoCoreError, bx.ClientError) as exc:
            raise self._error(exc, rel, "list") from None
        return objects, folders

    def _upload(self, path: Path, rel: str) -> None:
        # upload_file sends large files in parts; S3 shows the object only once it is complete.
        self._call(rel, "upload", self._client().upload_file, Filename=str(path), Bucket=self.bucket, Key=self.key(rel))

    def _download(self, rel: str, path: Path, size: int | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        os.close(fd)
        try:
            self._call(rel, "download", self._client().download_file, Bucket=self.bucket, Key=self.key(rel), Filename=tmp)
            got = os.path.getsize(tmp)
            if size is not None and got != size:
                raise StorageError(f"download of {self.describe(rel)} was cut short ({got} of {size} bytes): retry")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # records ------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> Path:
        path = self.local(rel)
        atomic_write_bytes(path, data)
        self._call(rel, "write", self._client().put_object, Bucket=self.bucket, Key=self.key(rel), Body=data)
        return path

    def read_bytes(self, rel: str) -> bytes | None:
        from botocore import exceptions as bx

        try:
            reply = self._client().get_object(Bucket=self.bucket, Key=self.key(rel))
            return reply["Body"].read()
        except bx.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404"):
                return None
            raise self._error(exc, rel, "read") from None
        except bx.BotoCoreError as exc:
            raise self._error(exc, rel, "read") from None

    def exists(self, rel: str) -> bool:
        from botocore import exceptions as bx

        try:
            self._client().head_object(Bucket=self.bucket, Key=self.key(rel))
            return True
        except bx.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                return False
            raise self._error(exc, rel, "read") from None
        except bx.BotoCoreError as exc:
            raise self._error(exc, rel, "read") from None

    def has_prefix(self, rel: str) -> bool:
        prefix = self.key(rel)
        reply = self._call(rel, "list", self._client().list_objects_v2, Bucket=self.bucket,
                           Prefix=f"{prefix}/" if prefix else "", MaxKeys=1)
        return bool(reply.get("KeyCount") or reply.get("Contents"))

    def list_dirs(self, rel: str) -> list[str]:
        return sorted(n for n in self._list(rel, delimiter=True)[1] if n)

    def push_file(self, rel: str) -> None:
        self._upload(self.local(rel), rel)

    def push_dir(self, rel: str) -> None:
        root = self.local(rel)
        for path in _files(root):
            if not path.name.startswith("."):  # temporary files of atomic writes
                self._upload(path, f"{_clean_rel(rel)}/{path.relative_to(root).as_posix()}")

    def check(self) -> None:
        """The bucket exists and accepts a write and a delete under the prefix."""
        self._call("", "open bucket", self._client().head_bucket, Bucket=self.bucket)
        probe = ".write-check"
        self._call(probe, "write", self._client().put_object, Bucket=self.bucket, Key=self.key(probe), Body=b"ok\n")
        self._call(probe, "delete", self._client().delete_object, Bucket=self.bucket, Key=self.key(probe))

    # checkpoints --------------------------------------------------------------------------
    def _markers(self, rel: str) -> dict[int, str]:
        """step -> marker key of the complete checkpoints under ``rel``."""
        base = self.key(rel)
        found = {}
        for obj in self._list(rel)[0]:
            tail = obj["Key"][len(base) + 1:] if base else obj["Key"]
            parts = tail.split("/")
            if len(parts) == 2 and parts[1] == COMPLETE_MARKER and (step := _step(parts[0])) is not None:
                found[step] = obj["Key"]
        return found

    def checkpoint_steps(self, rel: str) -> list[int]:
        return sorted(self._markers(rel))

    def push_checkpoint(self, rel: str, folder: Path, *, keep: int = 0) -> None:
        folder = Path(folder)
        step = _step(folder.name)
        if step is None or not (folder / "state.pt").is_file():
            raise StorageError(f"{folder} is not a complete checkpoint folder (step-N with state.pt)")
        rel = _clean_rel(rel)
        files = {}
        for path in _files(folder):
            name = path.relative_to(folder).as_posix()
            self._upload(path, f"{rel}/{folder.name}/{name}")
            files[name] = path.stat().st_size
        # The marker goes last: a checkpoint without it is an upload cut short and never used.
        marker = json.dumps({"step": step, "files": files}, sort_keys=True).encode()
        self._call(rel, "write", self._client().put_object, Bucket=self.bucket,
                   Key=self.key(f"{rel}/{folder.name}/{COMPLETE_MARKER}"), Body=marker)
        if keep > 0:
            self._prune(rel, keep)

    def _prune(self, rel: str, keep: int) -> None:
        steps = self.checkpoint_steps(rel)
        if len(steps) <= keep:
            return
        oldest_kept = steps[-keep]
        objects = self._list(rel)[0]
        base = self.key(rel)
        doomed: dict[int, list[str]] = {}
        for obj in objects:
            step = _step(obj["Key"][len(base) + 1:].split("/", 1)[0])
            if step is not None and step < oldest_kept:
                doomed.setdefault(step, []).append(obj["Key"])
        for step, keys in doomed.items():
            # The marker first: a checkpoint being deleted stops counting before its files go.
            keys.sort(key=lambda k: not k.endswith(f"/{COMPLETE_MARKER}"))
            for key in keys:
                self._call(rel, "delete", self._client().delete_object, Bucket=self.bucket, Key=key)

    def pull_checkpoint(self, rel: str) -> Path | None:
        rel = _clean_rel(rel)
        root = self.local(rel)
        local = latest_checkpoint(root)
        local_step = _step(local.name) if local is not None else None
        markers = self._markers(rel)
        if not markers:
            return local
        step = max(markers)
        if local_step is not None and local_step >= step:
            return local
        name = f"{CHECKPOINT_PREFIX}{step:08d}"
        raw = self._call(rel, "read", self._client().get_object, Bucket=self.bucket, Key=markers[step])["Body"].read()
        files = json.loads(raw.decode())["files"]
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.pull."))
        try:
            for fname, size in files.items():
                fname = _clean_rel(fname)  # a marker naming ../x must not write outside the folder
                self._download(f"{rel}/{name}/{fname}", tmp / fname, int(size))
            os.chmod(tmp, 0o755)
            final = root / name
            try:
                os.replace(tmp, final)
            except OSError:
                if not (final / "state.pt").is_file():  # not another rank's complete copy
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return root / name

    # Ray ----------------------------------------------------------------------------------
    def ray_storage(self, rel: str) -> tuple[str, Any]:
        return f"{self.bucket}/{self.key(rel)}", arrow_filesystem()


def arrow_filesystem():
    """A ``pyarrow.fs.S3FileSystem`` for the S3 server in the environment.

    The endpoint and region are passed; the keys are not (pyarrow reads ``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY`` itself on every node), so a pickled filesystem holds no secret.
    """
    from urllib.parse import urlparse

    import pyarrow.fs

    from orchestrator.data.s3 import endpoint_url

    kwargs: dict[str, Any] = {
        "region": os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
    }
    url = endpoint_url()
    if url:
        parsed = urlparse(url if "://" in url else f"https://{url}")
        kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        kwargs["scheme"] = parsed.scheme or "https"
    return pyarrow.fs.S3FileSystem(**kwargs)


def open_storage(uri: str, *, work_dir: str | os.PathLike | None = None) -> Storage:
    """The storage for ``storage.path``: :class:`S3Storage` for ``s3://``, else :class:`LocalStorage`."""
    if str(uri).startswith("s3://"):
        return S3Storage(str(uri), work_dir=work_dir)
    return LocalStorage(uri)
