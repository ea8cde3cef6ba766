"""The trace row: one reasoning problem with its verified solution, and row validation."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

# Rejection reason codes (exact strings: reports and tests key on them).
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
EMPTY_FIELD = "empty_field"
WRONG_TYPE = "wrong_type"
UNVERIFIABLE = "unverifiable"
DUPLICATE = "duplicate"
CONTAMINATION = "contamination"
OVER_LENGTH = "over_length"
REASONS: tuple[str, ...] = (
    MALFORMED_JSON, NOT_AN_OBJECT, MISSING_FIELD, EMPTY_FIELD, WRONG_TYPE,
    UNVERIFIABLE, DUPLICATE, CONTAMINATION, OVER_LENGTH,
)

REQUIRED_TEXT_FIELDS: tuple[str, ...] = ("problem", "solution")
OPTIONAL_TEXT_FIELDS: tuple[str, ...] = ("answer", "id", "source")


@dataclass(frozen=True)
class Trace:
    """A problem with its step-by-step solution and final answer (the row of every data file)."""

    id: str
    problem: str
    solution: str
    answer: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "problem": self.problem, "solution": self.solution,
            "answer": self.answer, "source": self.source, "meta": self.meta,
        }

    def to_json_line(self) -> str:
        """One deterministic JSONL line (sorted keys, UTF-8 kept), newline included."""
        return json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False) + "\n"


@dataclass(frozen=True)
class Rejection:
    """Why a row was refused: a reason code, the field concerned (if any) and a readable message."""

    reason: str
    field: str | None
    message: str


@dataclass(frozen=True)
class RowFields:
    """A row that passed schema validation; ``answer``/``id`` may still be missing."""

    problem: str
    solution: str
    answer: str | None
    id: str | None
    source: str | None
    meta: dict[str, Any]


def derived_id(problem: str) -> str:
    """Stable id for a row without one: a hash of its problem text."""
    return "p-" + hashlib.sha256(problem.encode("utf-8")).hexdigest()[:16]


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _optional_text(row: dict[str, Any], name: str) -> tuple[str | None, Rejection | None]:
    """An optional scalar field as text; numbers are accepted for ``answer`` and ``id``."""
    value = row.get(name)
    if value is None:
        return None, None
    numeric_ok = name in ("answer", "id")
    if isinstance(value, bool) or not (
        isinstance(value, str) or (numeric_ok and isinstance(value, (int, float)))
    ):
        return None, Rejection(WRONG_TYPE, name, f"field '{name}' must be a string, got {_type_name(value)}")
    text = str(value).strip()
    if not text:
        return None, Rejection(EMPTY_FIELD, name, f"field '{name}' is empty")
    return text, None


def validate_row(row: Any) -> tuple[RowFields | None, Rejection | None]:
    """Check one parsed JSON value against the trace schema.

    Exactly one of the two results is None. Required: ``problem`` and ``solution`` (non-empty
    strings). Optional: ``answer``, ``id`` (string or number), ``source`` (string), ``meta`` (object);
    null counts as absent for optional fields. Unknown keys are ignored.
    """
    if not isinstance(row, dict):
        return None, Rejection(NOT_AN_OBJECT, None, f"row must be a JSON object, got {_type_name(row)}")
    texts: dict[str, str] = {}
    for name in REQUIRED_TEXT_FIELDS:
        if name not in row or row[name] is None:
            return None, Rejection(MISSING_FIELD, name, f"required field '{name}' is missing")
        value = row[name]
        if not isinstance(value, str):
            return None, Rejection(
                WRONG_TYPE, name, f"field '{name}' must be a string, got {_type_name(value)}"
            )
        if not value.strip():
            return None, Rejection(EMPTY_FIELD, name, f"field '{name}' is empty")
        texts[name] = value.strip()
    optional: dict[str, str | None] = {}
    for name in OPTIONAL_TEXT_FIELDS:
        optional[name], rejection = _optional_text(row, name)
        if rejection is not None:
            return None, rejection
    meta = row.get("meta")
    if meta is None:
        meta = {}
    elif not isinstance(meta, dict):
        return None, Rejection(WRONG_TYPE, "meta", f"field 'meta' must be an object, got {_type_name(meta)}")
    return RowFields(
        problem=texts["problem"], solution=texts["solution"], answer=optional["answer"],
        id=optional["id"], source=optional["source"], meta=meta,
    ), None
