"""The one atomic write (orchestrator/fileio.py): whole files or none, readable by others, no litter."""

from __future__ import annotations

import json
import os
import stat

import pytest

from orchestrator.fileio import atomic_directory, atomic_output, atomic_write_bytes, atomic_write_json, sha256_file


def test_atomic_write_replaces_whole_files(tmp_path) -> None:
    path = tmp_path / "a" / "b" / "record.json"
    atomic_write_json(path, {"b": 1, "a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1} and path.read_text().endswith("\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # mkstemp's 0600 would hide it from other users
    inode = path.stat().st_ino
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and path.stat().st_ino != inode  # renamed over, not rewritten in place
    assert os.listdir(path.parent) == ["record.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path) -> None:
    path = tmp_path / "report.png"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_output(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer died")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["report.png"]


def test_sha256_file(tmp_path) -> None:
    path = atomic_write_bytes(tmp_path / "x", b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_atomic_directory_publishes_a_folder_whole(tmp_path) -> None:
    final = tmp_path / "ckpt" / "step-00000002"
    with atomic_directory(final) as tmp:
        (tmp / "state.pt").write_bytes(b"v1")
        assert not final.exists()  # nothing is visible before the rename
    assert (final / "state.pt").read_bytes() == b"v1" and stat.S_IMODE(final.stat().st_mode) == 0o755
    with atomic_directory(final) as tmp:  # a rerun of the same step replaces it whole
        (tmp / "meta.json").write_bytes(b"{}")
    assert os.listdir(final) == ["meta.json"] and os.listdir(final.parent) == ["step-00000002"]
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as tmp:
            (tmp / "meta.json").write_bytes(b"half")
            raise RuntimeError("writer died")
    assert (final / "meta.json").read_bytes() == b"{}" and os.listdir(final.parent) == ["step-00000002"]


def test_atomic_directory_keeps_a_complete_copy_another_writer_published(tmp_path) -> None:
    final = tmp_path / "step-00000001"
    final.mkdir()
    (final / "state.pt").write_bytes(b"theirs")
    with atomic_directory(final, keep_existing=lambda p: (p / "state.pt").is_file()) as tmp:
        (tmp / "state.pt").write_bytes(b"mine")
    assert (final / "state.pt").read_bytes() == b"theirs" and os.listdir(tmp_path) == ["step-00000001"]
