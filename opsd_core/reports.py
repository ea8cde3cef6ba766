"""Report files shared by every stage: atomic JSON writes and short content hashes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as sorted, indented JSON; readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def file_hash(path: Path) -> str:
    """The first 16 hex digits of a file's sha256."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
