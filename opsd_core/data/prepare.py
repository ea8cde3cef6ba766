"""The prepare stage: raw traces -> validated, verified, deduplicated, decontaminated train/val splits.

Every input line ends up either in an output split or in ``reports/rejected.jsonl`` with its file,
line and reason; nothing is dropped silently. All outputs are byte-deterministic functions of the
inputs and the config (no timestamps, no absolute paths), so DVC can cache them.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from opsd_core.config import DataConfig
from opsd_core.data.bundled import load_gsm8k100
from opsd_core.data.contamination import ContaminationIndex
from opsd_core.data.dedupe import Deduplicator
from opsd_core.data.reader import RawLine, list_raw_files, read_raw_dir
from opsd_core.data.schema import (
    CONTAMINATION,
    DUPLICATE,
    OVER_LENGTH,
    REASONS,
    UNVERIFIABLE,
    Rejection,
    RowFields,
    Trace,
    derived_id,
    validate_row,
)
from opsd_core.data.split import cap_rows, split_traces
from opsd_core.data.verify import answers_match, extract_answer
from opsd_core.errors import OpsdError
from opsd_core.io import atomic_write, write_json
from opsd_core.layout import DATA_REPORT, GSM8K_EVAL, REJECTED, TRAIN_SPLIT, VAL_SPLIT

EVAL_FILE = GSM8K_EVAL
TokenCounter = Callable[[str], int]


class DataError(OpsdError, RuntimeError):
    """The prepare stage cannot produce usable data (message says where to look)."""


@dataclass
class PrepareSummary:
    """What ``reports/data.json`` holds (all paths relative to the project root)."""

    read: int = 0
    accepted: int = 0
    train: int = 0
    val: int = 0
    capped: int = 0
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=lambda: {r: 0 for r in REASONS})
    contamination_removed: int = 0
    eval_rows: int = 0
    per_file: dict[str, dict[str, int]] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    data_hash: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Rejected:
    line: RawLine
    rejection: Rejection

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.line.file, "line": self.line.line, "reason": self.rejection.reason,
            "field": self.rejection.field, "message": self.rejection.message, "raw": self.line.text,
        }


def whitespace_tokens(text: str) -> int:
    """Fallback token count: whitespace-separated words."""
    return len(text.split())


def _verify(fields: RowFields) -> tuple[str | None, Rejection | None]:
    """The verified final answer of a row, or why it cannot be verified."""
    extracted = extract_answer(fields.solution)
    if extracted is None:
        return None, Rejection(
            UNVERIFIABLE, "solution", "no final answer found in solution (expected '#### N' or \\boxed{N})"
        )
    if fields.answer is None:
        return extracted, None
    if not answers_match(extracted, fields.answer):
        return None, Rejection(
            UNVERIFIABLE, "answer",
            f"solution's final answer {extracted!r} does not match answer {fields.answer!r}",
        )
    return fields.answer, None


def _over_length(fields: RowFields, cfg: DataConfig, count: TokenCounter) -> Rejection | None:
    for name, text, limit in (
        ("problem", fields.problem, cfg.max_problem_tokens),
        ("solution", fields.solution, cfg.max_solution_tokens),
    ):
        n = count(text)
        if n > limit:
            return Rejection(OVER_LENGTH, name, f"field '{name}' has {n} tokens, over the limit of {limit}")
    return None


class _Screen:
    """Applies the row checks in order; keeps the state that spans rows (duplicates)."""

    def __init__(self, cfg: DataConfig, count: TokenCounter, index: ContaminationIndex) -> None:
        self.cfg, self.count, self.index = cfg, count, index
        self.problems = Deduplicator()
        self.ids: dict[str, RawLine] = {}

    def check(self, raw: RawLine) -> tuple[Trace | None, Rejection | None]:
        if raw.error is not None:
            return None, raw.error
        fields, rejection = validate_row(raw.value)
        if fields is None:
            return None, rejection
        answer, rejection = _verify(fields)
        if answer is None:
            return None, rejection
        rejection = _over_length(fields, self.cfg, self.count)
        if rejection is not None:
            return None, rejection
        hit = self.index.match(fields.problem)
        if hit is not None:
            return None, Rejection(
                CONTAMINATION, "problem",
                f"problem shares the {self.index.n}-gram {hit[1]!r} with evaluation problem {hit[0]}",
            )
        # duplicates last: the first row that is otherwise acceptable wins
        first = self.problems.first_id(fields.problem)
        if first is not None:
            return None, Rejection(DUPLICATE, "problem", f"same problem as accepted row {first}")
        row_id = fields.id or derived_id(fields.problem)
        if row_id in self.ids:
            seen = self.ids[row_id]
            return None, Rejection(DUPLICATE, "id", f"id {row_id!r} already used at {seen.file}:{seen.line}")
        self.problems.add(fields.problem, row_id)
        self.ids[row_id] = raw
        source = fields.source or Path(raw.file).stem
        return Trace(row_id, fields.problem, fields.solution, answer, source, fields.meta), None


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> bytes:
    """Write rows as deterministic JSONL (atomically); returns the bytes written."""
    blob = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    atomic_write(path, blob)
    return blob


def _rel(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _file_counts(summary: PrepareSummary, file: str, key: str) -> None:
    counts = summary.per_file.setdefault(file, {"read": 0, "accepted": 0, "rejected": 0})
    counts[key] += 1


def _write_outputs(
    splits: dict[Path, Sequence[Trace]], root: Path, summary: PrepareSummary
) -> None:
    digest = hashlib.sha256()
    for path, rows in splits.items():
        blob = _write_jsonl(path, (t.to_dict() for t in rows))
        rel = _rel(path, root)
        summary.outputs[rel] = hashlib.sha256(blob).hexdigest()
        digest.update(rel.encode("utf-8") + b"\x00" + blob + b"\x00")
    summary.data_hash = digest.hexdigest()


def prepare_data(
    cfg: DataConfig, root: Path, count_tokens: TokenCounter | None, reports_dir: Path,
) -> PrepareSummary:
    """Run the prepare stage; see the module docstring. ``reports_dir`` may be relative to ``root``.

    Raises :class:`DataError` when the raw folder holds no ``*.jsonl`` file or no row survives.
    """
    root = Path(root)
    raw_dir = root / cfg.raw_dir
    reports = reports_dir if Path(reports_dir).is_absolute() else root / reports_dir
    if not list_raw_files(raw_dir):
        raise DataError(f"no *.jsonl trace files in {raw_dir} (run `opsd data generate` to create some)")
    count = count_tokens or whitespace_tokens

    eval_rows = load_gsm8k100()
    index = ContaminationIndex(((t.id, t.problem) for t in eval_rows), cfg.contamination_ngram)
    screen = _Screen(cfg, count, index)
    summary = PrepareSummary(eval_rows=len(eval_rows))
    accepted: list[Trace] = []
    rejected: list[_Rejected] = []
    for raw in read_raw_dir(raw_dir, root):
        summary.read += 1
        _file_counts(summary, raw.file, "read")
        trace, rejection = screen.check(raw)
        if trace is not None:
            accepted.append(trace)
            _file_counts(summary, raw.file, "accepted")
        else:
            assert rejection is not None
            rejected.append(_Rejected(raw, rejection))
            _file_counts(summary, raw.file, "rejected")

    reasons = Counter(r.rejection.reason for r in rejected)
    summary.rejected = len(rejected)
    summary.rejected_by_reason = {r: reasons.get(r, 0) for r in REASONS}
    summary.contamination_removed = reasons.get(CONTAMINATION, 0)
    summary.accepted = len(accepted)
    reports.mkdir(parents=True, exist_ok=True)
    rejected_path = reports / REJECTED
    _write_jsonl(rejected_path, (r.to_dict() for r in rejected))
    if not accepted:
        raise DataError(
            f"no usable rows in {raw_dir}: all {summary.read} were rejected; "
            f"see {_rel(rejected_path, root)} for the reasons"
        )

    train, val = split_traces(accepted, cfg.val_fraction)
    train, summary.capped = cap_rows(train, cfg.max_train_rows)
    if not train:
        raise DataError(
            f"no training rows: all {len(val)} accepted rows from {raw_dir} fell into the val split "
            f"(data.val_fraction={cfg.val_fraction}); add data or lower val_fraction"
        )
    summary.train, summary.val = len(train), len(val)
    prepared, eval_dir = root / cfg.prepared_dir, root / cfg.eval_dir
    _write_outputs(
        {prepared / TRAIN_SPLIT: train, prepared / VAL_SPLIT: val, eval_dir / EVAL_FILE: eval_rows},
        root, summary,
    )
    write_json(reports / DATA_REPORT, summary.to_dict())
    return summary
