"""Deterministic train/val assignment by problem hash (independent of row order and seeds)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal

from opsd_core.data.dedupe import normalize_problem
from opsd_core.data.schema import Trace

Split = Literal["train", "val"]


def split_score(problem: str) -> float:
    """A uniform-looking number in [0, 1) fixed by the normalised problem text."""
    digest = hashlib.sha256(b"opsd-split\x00" + normalize_problem(problem).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_split(problem: str, val_fraction: float) -> Split:
    return "val" if split_score(problem) < val_fraction else "train"


def split_traces(traces: Sequence[Trace], val_fraction: float) -> tuple[list[Trace], list[Trace]]:
    """(train, val), each sorted by id so the output does not depend on the input order."""
    train = [t for t in traces if assign_split(t.problem, val_fraction) == "train"]
    val = [t for t in traces if assign_split(t.problem, val_fraction) == "val"]
    return sorted(train, key=lambda t: t.id), sorted(val, key=lambda t: t.id)


def cap_rows(traces: Sequence[Trace], limit: int | None) -> tuple[list[Trace], int]:
    """Keep at most ``limit`` rows, chosen by hash order (not input order); returns (kept, dropped).

    The kept rows come back sorted by id.
    """
    if limit is None or len(traces) <= limit:
        return sorted(traces, key=lambda t: t.id), 0
    by_hash = sorted(traces, key=lambda t: (split_score(t.problem), t.id))
    kept = by_hash[:limit]
    return sorted(kept, key=lambda t: t.id), len(traces) - limit
