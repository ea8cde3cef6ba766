"""The file plumbing every stage shares (opsd_core/io.py)."""

from __future__ import annotations

import errno
import hashlib
import json
import resource
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from opsd_core.io import atomic_write, file_hash, json_hash, numbers_only, write_json


def test_atomic_write_replaces_whole_files_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b.json"
    atomic_write(path, "first")
    atomic_write(path, b"second")
    assert path.read_text() == "second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["b.json"]


@contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """A real write failure part-way: past ``limit`` bytes of a file, write() fails with EFBIG (as on a full
    disk, after the first bytes have landed). CPython ignores SIGXFSZ, so the error is raised, not a signal."""
    assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_json(path, {"v": 1})
    old = path.read_bytes()
    with file_size_limit(4096), pytest.raises(OSError) as failed:
        atomic_write(path, json.dumps({"v": "x" * 65536}))  # the first 4 KiB are written, then the disk refuses
    assert failed.value.errno == errno.EFBIG
    assert path.read_bytes() == old  # a writer that opened r.json itself would have left 4 KiB of the new text
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # and no temporary


def test_json_hash_ignores_key_order_and_sees_values() -> None:
    assert json_hash({"a": 1, "b": [1, 2]}) == json_hash({"b": [1, 2], "a": 1})
    assert json_hash({"a": 1}) != json_hash({"a": 2})
    expected = hashlib.sha256(json.dumps({"a": 1}, sort_keys=True).encode()).hexdigest()[:16]
    assert json_hash({"a": 1}) == expected  # the run keys and caches written before keep their names


def test_file_hash_digits(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"opsd")
    full = hashlib.sha256(b"opsd").hexdigest()
    assert file_hash(path) == full[:16] and file_hash(path, 64) == full and file_hash(path, 12) == full[:12]


def test_numbers_only_keeps_numeric_leaves() -> None:
    tree = {"n": 3, "x": 0.5, "ok": True, "name": "a", "hash": "abc", "list": [1, 2],
            "nested": {"k": 1, "s": "t", "empty": {"s": "u"}}, "none": None}
    assert numbers_only(tree) == {"n": 3, "x": 0.5, "nested": {"k": 1}}
