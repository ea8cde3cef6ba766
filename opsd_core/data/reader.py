"""Line-numbered JSONL reading that never loses a row.

Every non-blank line of every ``*.jsonl`` file becomes a :class:`RawLine`: either a parsed value or
a ``malformed_json`` rejection (bad JSON or bad UTF-8) carrying its file and line number.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opsd_core.data.schema import MALFORMED_JSON, Rejection


@dataclass(frozen=True)
class RawLine:
    """One input line: ``file`` is a POSIX path relative to the project root, ``line`` is 1-based."""

    file: str
    line: int
    text: str
    value: Any = None
    error: Rejection | None = None


def list_raw_files(raw_dir: Path) -> list[Path]:
    """Every ``*.jsonl`` under ``raw_dir`` (recursively, hidden folders skipped), sorted by path."""
    if not raw_dir.is_dir():
        return []
    files = [
        p for p in raw_dir.rglob("*.jsonl")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(raw_dir).parts)
    ]
    return sorted(files, key=lambda p: p.relative_to(raw_dir).as_posix())


def _display_path(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _parse_line(raw: bytes, file: str, number: int) -> RawLine | None:
    """Decode and parse one line; None for blank lines (they carry no row)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        text = raw.decode("utf-8", errors="replace")
        return RawLine(file, number, text, error=Rejection(
            MALFORMED_JSON, None, f"line is not valid UTF-8 (byte {err.start}: {err.reason})",
        ))
    text = text.rstrip("\r")
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as err:
        return RawLine(file, number, text, error=Rejection(MALFORMED_JSON, None, f"invalid JSON: {err}"))
    return RawLine(file, number, text, value=value)


def read_jsonl(path: Path, root: Path) -> Iterator[RawLine]:
    """Lines of one JSONL file, numbered from 1; blank lines are skipped but still counted."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark is not part of the first row
        data = data[3:]
    file = _display_path(path, root)
    for number, raw in enumerate(data.split(b"\n"), start=1):
        parsed = _parse_line(raw, file, number)
        if parsed is not None:
            yield parsed


def read_raw_dir(raw_dir: Path, root: Path) -> Iterator[RawLine]:
    """Every line of every raw file, files in sorted order."""
    for path in list_raw_files(raw_dir):
        yield from read_jsonl(path, root)
