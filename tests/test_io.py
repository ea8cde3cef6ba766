"""The file plumbing every stage shares (opsd_core/io.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from opsd_core.io import atomic_write, file_hash, json_hash, numbers_only, write_json


def test_atomic_write_replaces_whole_files_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b.json"
    atomic_write(path, "first")
    atomic_write(path, b"second")
    assert path.read_text() == "second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["b.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_json(path, {"v": 1})
    with pytest.raises(TypeError):
        atomic_write(path, 42)  # type: ignore[arg-type]  (neither text nor bytes)
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


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
