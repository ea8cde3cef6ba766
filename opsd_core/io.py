"""File plumbing shared by every stage: one atomic writer, one JSON report writer, one content hash.

Every file opsd writes for another stage (or another process) to read goes through :func:`atomic_write`,
so a reader never sees a half-written file; every folder (a candidate, a checkpoint, a converted model)
through :func:`atomic_dir`: built under a temporary name, put in place by one rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` through a temporary sibling and one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(target: Path, keep: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``target`` to build a folder in; when the block ends normally it
    replaces ``target`` (an older one is removed first) by one rename, unless ``keep(target)`` says the
    ``target`` found there then is to stay (a cache entry another writer completed meanwhile). An exception,
    a full disk included, removes the temporary folder and leaves ``target`` as it was, so no reader sees a
    half-built folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            if keep is not None and keep(target):
                return
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """``payload`` as sorted, indented JSON (non-ASCII kept as is), atomically."""
    atomic_write(path, json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n")


def numbers_only(tree: Any) -> Any:
    """``tree`` with only its numeric leaves (bools, strings, lists and empty branches dropped): what a
    DVC metrics file holds, so that ``dvc metrics show`` and ``dvc exp show`` stay a readable table."""
    if isinstance(tree, dict):
        kept = {k: numbers_only(v) for k, v in tree.items()}
        return {k: v for k, v in kept.items() if v is not None and v != {}}
    if isinstance(tree, int | float) and not isinstance(tree, bool):
        return tree
    return None


def write_metrics(reports_dir: Path, name: str, values: Any) -> None:
    """``<reports_dir>/metrics/<name>.json``: the numeric leaves of ``values``, what DVC tracks as metrics."""
    write_json(reports_dir / "metrics" / f"{name}.json", numbers_only(values))


def json_hash(value: Any) -> str:
    """The first 16 hex digits of the sha256 of ``value`` as key-sorted JSON: equal values, equal hashes."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def file_hash(path: Path, digits: int = 16) -> str:
    """The first ``digits`` hex digits of a file's sha256 (64: all of it); read in blocks, so a
    model-sized file costs no memory."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()[:digits]
