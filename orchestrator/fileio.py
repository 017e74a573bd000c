"""The project's one atomic write: readers see the old file or the new one, never a part.

Every file the project writes for others to read back (records, checkpoints' side files,
tokenizers, manifests, reports, downloads) goes through here: the data goes to a temporary
file in the destination folder (same file system, so the rename is atomic), is flushed and
``fsync``-ed (the rename must not publish bytes still in the page cache), made readable by
other users (``mkstemp`` creates 0600), then renamed over the destination with ``os.replace``.
Temporary names start with a dot and end with ``.tmp``, so listings and uploads skip them.
A folder published whole (a checkpoint, a downloaded checkpoint) is filled the same way, in a
temporary folder beside it renamed into place (:func:`atomic_directory`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

FILE_MODE = 0o644
DIR_MODE = 0o755  # mkdtemp creates 0700
TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; renamed into place on success.

    For writers that need a file name (``soundfile.write``, ``savefig``, ``download_file``).
    On an exception the temporary file is removed and ``path`` is unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, keep_existing: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """A temporary folder to fill with ``path``'s new content; renamed into place on success.

    Its files are ``fsync``-ed before the rename. A ``path`` already there is replaced whole (a
    rerun of the same checkpoint step), unless ``keep_existing(path)`` says it is complete (another
    writer published it first): then it is kept and the new copy dropped. On an exception, or
    when the existing folder is kept, the temporary folder is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX))
    try:
        yield tmp
        for item in tmp.rglob("*"):
            if item.is_file():
                _fsync(item)
        os.chmod(tmp, DIR_MODE)
        if path.exists():
            if keep_existing is not None and keep_existing(path):
                return
            shutil.rmtree(path)
        try:
            os.replace(tmp, path)
        except OSError:  # another writer renamed its copy into place since the check
            if keep_existing is None or not keep_existing(path):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; return ``path``."""
    path = Path(path)
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_bytes(obj: Any) -> bytes:
    """The project's JSON file format: indented, sorted keys, a final newline."""
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON (:func:`json_bytes`) to ``path`` atomically."""
    return atomic_write_bytes(path, json_bytes(obj))


def sha256_file(path: str | os.PathLike, *, block: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()
