"""Where a sweep keeps what must survive: a local (or shared) folder, or ``s3://bucket/prefix``.

Both backends have the same methods and the same layout of relative paths (``rel``), see
:mod:`orchestrator.tuner`. Code that writes files the training loops read back (checkpoints,
reports) works in :meth:`Storage.local` -- for a folder that is the storage itself, for S3 a
node-local working folder (under ``POM_WORK_DIR``, default ``<tmp>/pom-ablations-work``) that
mirrors the prefix -- and then publishes them:

* small records (``trial.json``, ``pretrain.done.json``, ``final_metrics.json``, ...) with
  :meth:`write_json` / :meth:`read_json` (atomic: a rename locally, one complete PUT on S3);
* checkpoints with :meth:`push_checkpoint` after the loop has written one, and
  :meth:`pull_checkpoint` before a stage starts or resumes, so a trial restarted on another
  node resumes from its newest checkpoint. On S3 a checkpoint ``<rel>/step-N/`` is its files
  followed by a ``step-N/_COMPLETE.json`` marker listing them with their sizes and SHA-256;
  only checkpoints with a marker count, so an upload cut short is never picked up;
* Ray Tune / Ray Train storage through :meth:`ray_storage` (``storage_path`` and a
  ``pyarrow.fs.S3FileSystem`` built from the standard ``AWS_*`` variables: no key is passed
  explicitly, so none ends up in a pickled run configuration).

Nothing node-local is reused unless the durable store proves it belongs to this store: the
working folder is keyed by the store's identity (endpoint, bucket, prefix and the instance id in
``<prefix>/_storage_id.json``, written once at first use, so a bucket purged and created again is
a new store), and :meth:`S3Storage.pull_checkpoint` keeps a local checkpoint only when S3 holds
its completion marker with the same content hash, deleting any other.

S3 access (:mod:`orchestrator.s3`, the project's one S3 layer) honours ``AWS_ENDPOINT_URL`` (any S3-compatible server), ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY`` and ``AWS_DEFAULT_REGION``; every failure is one
:class:`StorageError` line naming the URI and what to check.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from models.typed_config import UserError  # the base of every user error (orchestrator.errors)
from orchestrator import s3
from orchestrator.fileio import atomic_directory, atomic_write_bytes, json_bytes, sha256_file
from orchestrator.train.checkpoint import latest_checkpoint, list_checkpoints

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step-"
COMPLETE_MARKER = "_COMPLETE.json"
STORAGE_ID = "_storage_id.json"
BEST_POINTER = "best.json"  # orchestrator.train.checkpoint's pointer to the best fine-tuning checkpoint
WORK_DIR_ENV = "POM_WORK_DIR"


class StorageError(UserError, RuntimeError):
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
        return self.write_bytes(rel, json_bytes(obj))

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
        return atomic_write_bytes(self.local(rel), data)

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
    """``s3://bucket/prefix`` with a node-local working folder; :mod:`orchestrator.s3` for objects."""

    is_remote = True

    def __init__(self, uri: str, *, work_dir: str | os.PathLike | None = None) -> None:
        try:
            self.bucket, prefix = s3.split_s3_uri(uri)
        except s3.S3Error as err:
            raise StorageError(str(err)) from None
        self.prefix = _clean_rel(prefix)
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        base = work_dir or os.environ.get(WORK_DIR_ENV) or Path(tempfile.gettempdir()) / "pom-ablations-work"
        self.work_base = Path(base).expanduser().resolve()
        self._identity: str | None = None
        self._work: Path | None = None

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        """S3 errors (one translation, :func:`orchestrator.s3.s3_error`) as ``StorageError`` naming storage.path."""
        try:
            yield
        except s3.S3Error as err:
            raise StorageError(f"storage.path {self.uri}: {err}") from None

    # identity and paths -------------------------------------------------------------------
    def identity(self) -> str:
        """This store's instance id, from ``<prefix>/_storage_id.json`` (written once, at first use).

        A bucket purged and created again, or another server at the same address, gets a new
        id, so node-local copies made for the old store are never taken for this one's.
        """
        if self._identity is None:
            key = self.key(STORAGE_ID)
            with self._translated():
                data = s3.get_bytes(self.bucket, key)
                if data is None:
                    record = {"id": uuid.uuid4().hex, "uri": self.uri, "created": time.time()}
                    try:
                        s3.put_bytes(self.bucket, key, json_bytes(record), if_none_match=True)
                    except s3.S3ConditionFailed:
                        pass  # another process created it first: use theirs
                    data = s3.get_bytes(self.bucket, key)
            try:
                identity = json.loads((data or b"").decode())["id"]
                if not isinstance(identity, str) or not identity:
                    raise ValueError(identity)
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                raise StorageError(f"{self.describe(STORAGE_ID)} is not a storage identity record: delete it "
                                   "(a new one is written; node-local copies of the old store are not reused)") from None
            self._identity = identity
        return self._identity

    @property
    def work(self) -> Path:
        """The node-local working folder: ``<POM_WORK_DIR>/<bucket>-<hash of endpoint, bucket, prefix, identity>/<prefix>``."""
        if self._work is None:
            self._work = work_folder(self.work_base, endpoint=s3.endpoint_url(), bucket=self.bucket,
                                     prefix=self.prefix, identity=self.identity())
        return self._work

    def key(self, rel: str = "") -> str:
        rel = _clean_rel(rel)
        return "/".join(p for p in (self.prefix, rel) if p)

    def local(self, rel: str = "") -> Path:
        rel = _clean_rel(rel)
        return self.work / rel if rel else self.work

    def describe(self, rel: str = "") -> str:
        return f"s3://{self.bucket}/{self.key(rel)}"

    def _list(self, rel: str) -> list[s3.S3Object]:
        prefix = self.key(rel)
        with self._translated():
            return s3.list_objects(self.bucket, f"{prefix}/" if prefix else "")

    def _upload(self, path: Path, rel: str) -> None:
        with self._translated():
            s3.upload_file(path, self.bucket, self.key(rel))

    # records ------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> Path:
        path = atomic_write_bytes(self.local(rel), data)
        with self._translated():
            s3.put_bytes(self.bucket, self.key(rel), data)
        return path

    def read_bytes(self, rel: str) -> bytes | None:
        with self._translated():
            return s3.get_bytes(self.bucket, self.key(rel))

    def exists(self, rel: str) -> bool:
        with self._translated():
            return s3.object_exists(self.bucket, self.key(rel))

    def has_prefix(self, rel: str) -> bool:
        prefix = self.key(rel)
        with self._translated():
            return s3.prefix_exists(self.bucket, f"{prefix}/" if prefix else "")

    def list_dirs(self, rel: str) -> list[str]:
        prefix = self.key(rel)
        with self._translated():
            return s3.list_folders(self.bucket, f"{prefix}/" if prefix else "")

    def push_file(self, rel: str) -> None:
        self._upload(self.local(rel), rel)

    def push_dir(self, rel: str) -> None:
        root = self.local(rel)
        for path in _files(root):
            if not path.name.startswith("."):  # temporary files of atomic writes
                self._upload(path, f"{_clean_rel(rel)}/{path.relative_to(root).as_posix()}")

    def check(self) -> None:
        """The bucket exists and accepts a write and a delete under the prefix."""
        probe = self.key(".write-check")
        with self._translated():
            s3.ensure_bucket(self.bucket, create=False)
            s3.put_bytes(self.bucket, probe, b"ok\n")
            s3.delete_object(self.bucket, probe)

    # checkpoints --------------------------------------------------------------------------
    def _markers(self, rel: str) -> dict[int, str]:
        """step -> marker key of the complete checkpoints under ``rel``."""
        base = self.key(rel)
        found = {}
        for obj in self._list(rel):
            parts = (obj.key[len(base) + 1:] if base else obj.key).split("/")
            if len(parts) == 2 and parts[1] == COMPLETE_MARKER and (step := _step(parts[0])) is not None:
                found[step] = obj.key
        return found

    def _marker(self, key: str) -> dict[str, Any]:
        with self._translated():
            raw = s3.get_bytes(self.bucket, key)
        try:
            marker = json.loads((raw or b"").decode())
            if not isinstance(marker.get("files"), dict):
                raise ValueError(key)
            return marker
        except (ValueError, AttributeError, UnicodeDecodeError):
            raise StorageError(f"s3://{self.bucket}/{key} is not a checkpoint completion marker: delete that "
                               "checkpoint folder in S3") from None

    def checkpoint_steps(self, rel: str) -> list[int]:
        return sorted(self._markers(rel))

    def push_checkpoint(self, rel: str, folder: Path, *, keep: int = 0) -> None:
        folder = Path(folder)
        step = _step(folder.name)
        if step is None or not (folder / "state.pt").is_file():
            raise StorageError(f"{folder} is not a complete checkpoint folder (step-N with state.pt)")
        rel = _clean_rel(rel)
        files = _manifest(folder)
        for name in files:
            self._upload(folder / name, f"{rel}/{folder.name}/{name}")
        best = _best_pointer(folder.parent)
        # The marker goes last: a checkpoint without it is an upload cut short and never used.
        marker = {"step": step, "files": files, "sha256": _content_hash(files), "storage_id": self.identity(),
                  "best": best}
        with self._translated():
            s3.put_bytes(self.bucket, self.key(f"{rel}/{folder.name}/{COMPLETE_MARKER}"), json_bytes(marker))
        if keep > 0:
            self._prune(rel, keep, protected=None if best is None else _step(str(best.get("path", ""))))

    def _prune(self, rel: str, keep: int, *, protected: int | None = None) -> None:
        """Delete all but the newest ``keep`` checkpoints (and the best one), as the local folder does."""
        steps = self.checkpoint_steps(rel)
        if len(steps) <= keep:
            return
        oldest_kept = steps[-keep]
        base = self.key(rel)
        doomed: dict[int, list[str]] = {}
        for obj in self._list(rel):
            step = _step(obj.key[len(base) + 1:].split("/", 1)[0])
            if step is not None and step < oldest_kept and step != protected:
                doomed.setdefault(step, []).append(obj.key)
        with self._translated():
            for keys in doomed.values():
                # The marker first: a checkpoint being deleted stops counting before its files go.
                keys.sort(key=lambda k: not k.endswith(f"/{COMPLETE_MARKER}"))
                for key in keys:
                    s3.delete_object(self.bucket, key)

    def pull_checkpoint(self, rel: str) -> Path | None:
        """The newest checkpoint S3 proves complete, verified or downloaded into the working folder.

        A local checkpoint is kept only when S3 holds its completion marker and its files hash
        to the marker's content hash; any other (left by a run on a purged store, or written
        but never uploaded) is deleted, so the training loop cannot resume from it.
        """
        rel = _clean_rel(rel)
        root = self.local(rel)
        keys = self._markers(rel)
        read: dict[int, dict[str, Any]] = {}

        def marker(step: int) -> dict[str, Any]:
            if step not in read:
                read[step] = self._marker(keys[step])
            return read[step]

        verified: dict[int, Path] = {}
        for folder in list_checkpoints(root):
            step = _step(folder.name)
            why = "S3 holds no completion marker for it"
            if step in keys:
                if _content_hash(_manifest(folder)) == marker(step).get("sha256"):
                    verified[step] = folder
                    continue
                why = "its content differs from the completion marker in S3"
            log.warning("discarding node-local checkpoint %s: %s (%s)", folder, why, self.describe(rel))
            shutil.rmtree(folder, ignore_errors=True)
        if not keys:
            (root / BEST_POINTER).unlink(missing_ok=True)
            return None
        step = max(keys)
        newest = verified.get(step) or self._download_checkpoint(rel, step, marker(step))
        best = marker(step).get("best")
        best_step = _step(str(best.get("path", ""))) if isinstance(best, dict) else None
        if best_step is not None and best_step in keys:  # fine-tuning resumes with its best checkpoint
            if best_step not in verified and best_step != step:
                self._download_checkpoint(rel, best_step, marker(best_step))
            atomic_write_bytes(root / BEST_POINTER, json_bytes(best))
        else:  # a pointer S3 does not confirm names nothing of this store
            (root / BEST_POINTER).unlink(missing_ok=True)
        return newest

    def _download_checkpoint(self, rel: str, step: int, marker: dict[str, Any]) -> Path:
        name = f"{CHECKPOINT_PREFIX}{step:08d}"
        final = self.local(rel) / name
        # Another rank's complete copy (state.pt is written last) is kept.
        with atomic_directory(final, keep_existing=lambda p: (p / "state.pt").is_file()) as tmp:
            for fname, entry in marker["files"].items():
                fname = _clean_rel(fname)  # a marker naming ../x must not write outside the folder
                size = entry["size"] if isinstance(entry, dict) else entry  # older markers: size only
                with self._translated():
                    s3.download_file(self.bucket, self.key(f"{rel}/{name}/{fname}"), tmp / fname, size=int(size))
            if "sha256" in marker and _content_hash(_manifest(tmp)) != marker["sha256"]:
                raise StorageError(f"{self.describe(f'{rel}/{name}')} does not match its completion marker "
                                   "(overwritten after it was written?): delete that checkpoint folder in S3")
        return final

    # Ray ----------------------------------------------------------------------------------
    def ray_storage(self, rel: str) -> tuple[str, Any]:
        return f"{self.bucket}/{self.key(rel)}", s3.arrow_filesystem()


def work_folder(base: str | os.PathLike, *, endpoint: str | None, bucket: str, prefix: str, identity: str) -> Path:
    """The node-local working folder of one S3 store: ``<base>/<bucket>-<digest>/<prefix>``, the
    digest over the endpoint, bucket, prefix and the store's identity."""
    who = f"{endpoint or 'aws'}|{bucket}|{_clean_rel(prefix)}|{identity}"
    return Path(base) / f"{bucket}-{hashlib.sha256(who.encode()).hexdigest()[:16]}" / _clean_rel(prefix)


def _manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """``relative name -> {size, sha256}`` of the files of a checkpoint folder (dot-files skipped)."""
    folder = Path(folder)
    return {
        path.relative_to(folder).as_posix(): {"size": path.stat().st_size, "sha256": sha256_file(path)}
        for path in _files(folder)
        if not any(part.startswith(".") for part in path.relative_to(folder).parts)
    }


def _best_pointer(root: Path) -> dict[str, Any] | None:
    """The best-checkpoint pointer of a checkpoint folder (``None`` when there is none)."""
    try:
        pointer = json.loads((Path(root) / BEST_POINTER).read_text())
    except (OSError, ValueError):
        return None
    return pointer if isinstance(pointer, dict) and _step(str(pointer.get("path", ""))) is not None else None


def _content_hash(files: dict[str, dict[str, Any]]) -> str:
    """One hash of a checkpoint's file names, sizes and contents."""
    lines = "".join(f"{name}\0{entry['size']}\0{entry['sha256']}\n" for name, entry in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


arrow_filesystem = s3.arrow_filesystem  # the old import path


def open_storage(uri: str, *, work_dir: str | os.PathLike | None = None) -> Storage:
    """The storage for ``storage.path``: :class:`S3Storage` for ``s3://``, else :class:`LocalStorage`."""
    if str(uri).startswith("s3://"):
        return S3Storage(str(uri), work_dir=work_dir)
    return LocalStorage(uri)
