"""The data stage: answer verification, validation with every rejection reason, split, bundled data."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from opsd_core.config import DataConfig, GenerateConfig
from opsd_core.data import (
    REASONS,
    DataError,
    answers_match,
    extract_answer,
    generate_raw,
    load_gsm8k100,
    normalize_answer,
    normalize_problem,
    prepare_data,
    validate_row,
)

# ---------------------------------------------------------------- verify


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so 12 + 3 = 15\n#### 15", "15"),
        ("total is 1,234 dollars\n#### 1,234\n", "1,234"),
        ("#### -7", "-7"),
        ("half of it\n####   0.50  ", "0.50"),
        (r"we get \boxed{\frac{3}{4}}.", r"\frac{3}{4}"),
        (r"first \boxed{1}, then finally \boxed{{2}^{10}}", "{2}^{10}"),
        (r"#### 5 but on reflection \boxed{6}", "6"),  # the answer written last wins
        (r"\boxed{6} and then\n#### 7", "7"),
        ("no final answer here", None),
        (r"unbalanced \boxed{3", None),
        ("#### \n", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("18.0", "18"),
        ("1,234", "1234"),
        ("$1,000.00", "1000"),
        ("-7", "-7.000"),
        (".5", "0.50"),
        ("25%", "25"),
        ("42.", "42"),
        (r"\frac{3}{4}", "3/4"),
        ("3 / 4", "3/4"),
        (r"\text{Yes}", "yes"),
    ],
)
def test_answers_match_equivalent_forms(a: str, b: str) -> None:
    assert answers_match(a, b)
    assert answers_match(b, a)


@pytest.mark.parametrize(("a", "b"), [("18", "19"), ("3/4", "0.75"), ("-7", "7"), ("1,2", "12"), ("", "")])
def test_answers_match_rejects_different(a: str, b: str) -> None:
    assert not answers_match(a, b)


def test_answers_match_none_is_never_equal() -> None:
    assert not answers_match(None, "1")
    assert not answers_match(None, None)


def test_normalize_answer_is_idempotent() -> None:
    for s in ["1,234.50", "-0.0", r"\$5", "Some Text.", "3 / 4"]:
        once = normalize_answer(s)
        assert normalize_answer(once) == once


def test_normalize_problem_ignores_case_space_punctuation() -> None:
    assert normalize_problem("How many  apples?\nTom has 3.") == normalize_problem("how many apples tom has 3")
    assert normalize_problem("It costs 3.5 dollars") != normalize_problem("It costs 35 dollars")


# ---------------------------------------------------------------- prepare: every rejection reason


def _trace(i: int, **extra: Any) -> dict[str, Any]:
    a, b = 3 + i, 7 * i + 1
    row = {
        "id": f"t{i:03d}",
        "problem": f"Robin has {a} red marbles and buys {b} blue marbles on day {i}. How many marbles now?",
        "solution": f"Robin has {a} + {b} = {a + b} marbles.\n#### {a + b}",
        "answer": str(a + b),
    }
    row.update(extra)
    return row


def _line(row: Any) -> str:
    return json.dumps(row)


def _write_raw(root: Path, name: str, lines: list[str | bytes]) -> None:
    raw = root / "data" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    blob = b"".join((ln if isinstance(ln, bytes) else ln.encode("utf-8")) + b"\n" for ln in lines)
    (raw / name).write_bytes(blob)


def _cfg(**kw: Any) -> DataConfig:
    defaults: dict[str, Any] = {"val_fraction": 0.25, "max_problem_tokens": 60, "max_solution_tokens": 60}
    defaults.update(kw)
    return DataConfig(**defaults)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def gsm8k100() -> list[Any]:
    return load_gsm8k100()


def test_prepare_reports_every_rejection_reason(tmp_path: Path, gsm8k100: list[Any]) -> None:
    eval_row = min(gsm8k100, key=lambda t: len(t.problem.split()))
    no_answer = _trace(20)
    del no_answer["answer"], no_answer["id"]
    missing_solution = _trace(3)
    del missing_solution["solution"]
    a_lines: list[str | bytes] = [
        _line(_trace(1)),                                                     # 1 accepted
        '{"problem": "unterminated", ',                                        # 2
        _line([1, 2, 3]),                                                      # 3
        _line(missing_solution),                                               # 4
        _line(_trace(4, problem="   ")),                                       # 5
        _line(_trace(5, problem=12)),                                          # 6
        _line(_trace(6, meta=["not", "a", "dict"])),                           # 7
        _line(_trace(7, solution="Robin counts them all.")),                   # 8 no answer in solution
        _line(_trace(8, answer="999")),                                        # 9 answer disagrees
        _line(_trace(9, id="t001-copy", problem=_trace(1)["problem"].upper().replace("?", " ?!"))),  # 10
        _line(_trace(10, problem=eval_row.problem)),                           # 11
        _line(_trace(11, problem="word " * 61 + "?")),                         # 12
        "",                                                                    # 13 blank: not a row
        _line(no_answer),                                                      # 14 accepted, answer derived
        _line(_trace(12, id="t001")),                                          # 15 id already used
        _line(_trace(13, answer="")),                                          # 16
        _line(_trace(14, answer=True)),                                        # 17
    ]
    b_lines: list[str | bytes] = [
        b'{"problem": "caf\xe9", "solution": "#### 1"}',                        # 1 not UTF-8
        _line(_trace(15, meta={"origin": "b"}, source="unit")),                # 2 accepted
    ]
    _write_raw(tmp_path, "a.jsonl", a_lines)
    _write_raw(tmp_path, "b.jsonl", b_lines)
    expected = {
        ("data/raw/a.jsonl", 2): ("malformed_json", None),
        ("data/raw/a.jsonl", 3): ("not_an_object", None),
        ("data/raw/a.jsonl", 4): ("missing_field", "solution"),
        ("data/raw/a.jsonl", 5): ("empty_field", "problem"),
        ("data/raw/a.jsonl", 6): ("wrong_type", "problem"),
        ("data/raw/a.jsonl", 7): ("wrong_type", "meta"),
        ("data/raw/a.jsonl", 8): ("unverifiable", "solution"),
        ("data/raw/a.jsonl", 9): ("unverifiable", "answer"),
        ("data/raw/a.jsonl", 10): ("duplicate", "problem"),
        ("data/raw/a.jsonl", 11): ("contamination", "problem"),
        ("data/raw/a.jsonl", 12): ("over_length", "problem"),
        ("data/raw/a.jsonl", 15): ("duplicate", "id"),
        ("data/raw/a.jsonl", 16): ("empty_field", "answer"),
        ("data/raw/a.jsonl", 17): ("wrong_type", "answer"),
        ("data/raw/b.jsonl", 1): ("malformed_json", None),
    }

    summary = prepare_data(_cfg(), tmp_path, None, Path("reports"))

    rejected = _read_jsonl(tmp_path / "reports" / "rejected.jsonl")
    got = {(r["file"], r["line"]): (r["reason"], r["field"]) for r in rejected}
    assert got == expected
    assert set(REASONS) == {reason for reason, _ in expected.values()}
    originals = {("data/raw/a.jsonl", i + 1): ln for i, ln in enumerate(a_lines)}
    for r in rejected:
        assert r["message"]
        if r["file"].endswith("a.jsonl"):
            assert r["raw"] == originals[(r["file"], r["line"])]
    assert "caf\ufffd" in next(r["raw"] for r in rejected if r["file"].endswith("b.jsonl"))
    # the contamination message names the evaluation problem it overlaps
    assert eval_row.id in next(r["message"] for r in rejected if r["reason"] == "contamination")

    report = json.loads((tmp_path / "reports" / "data.json").read_text())
    for reason in REASONS:
        assert report["rejected_by_reason"][reason] == sum(1 for v in expected.values() if v[0] == reason)
    assert report["read"] == len(a_lines) - 1 + len(b_lines)  # the blank line is not a row
    assert report["rejected"] == len(expected)
    assert report["accepted"] == 3 == summary.accepted
    assert report["contamination_removed"] == 1
    assert report["per_file"]["data/raw/b.jsonl"] == {"read": 2, "accepted": 1, "rejected": 1}
    assert len(report["data_hash"]) == 64

    prepared = tmp_path / "data" / "prepared"
    rows = _read_jsonl(prepared / "train.jsonl") + _read_jsonl(prepared / "val.jsonl")
    assert report["train"] + report["val"] == len(rows) == 3
    by_problem = {r["problem"]: r for r in rows}
    assert set(by_problem) == {_trace(1)["problem"], no_answer["problem"], _trace(15)["problem"]}
    derived = by_problem[no_answer["problem"]]
    assert derived["answer"] == str(3 + 20 + 7 * 20 + 1) and derived["id"]
    assert by_problem[_trace(15)["problem"]]["meta"] == {"origin": "b"}
    assert by_problem[_trace(15)["problem"]]["source"] == "unit"
    assert set(rows[0]) == {"id", "problem", "solution", "answer", "source", "meta"}
    assert len(_read_jsonl(tmp_path / "data" / "eval" / "gsm8k100.jsonl")) == 100


def test_token_counter_is_used_for_over_length(tmp_path: Path) -> None:
    _write_raw(tmp_path, "a.jsonl", [_line(_trace(i)) for i in range(6)])
    # a character counter makes every problem (> 60 characters) too long, while words would pass
    with pytest.raises(DataError, match="rejected.jsonl"):
        prepare_data(_cfg(), tmp_path, len, Path("reports"))
    rejected = _read_jsonl(tmp_path / "reports" / "rejected.jsonl")
    assert [r["reason"] for r in rejected] == ["over_length"] * 6


def test_validate_row_message_names_field() -> None:
    fields, rejection = validate_row({"problem": "p", "solution": ["s"]})
    assert fields is None and rejection is not None
    assert rejection.reason == "wrong_type" and "'solution'" in rejection.message


def test_no_raw_files_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "data" / "raw").mkdir(parents=True)
    with pytest.raises(DataError, match="data/raw"):
        prepare_data(_cfg(), tmp_path, None, Path("reports"))


# ---------------------------------------------------------------- split


def _prepare_bytes(root: Path, rows: list[dict[str, Any]], **cfg: Any) -> dict[str, bytes]:
    _write_raw(root, "traces.jsonl", [_line(r) for r in rows])
    prepare_data(_cfg(**cfg), root, None, root / "reports")
    names = ["data/prepared/train.jsonl", "data/prepared/val.jsonl", "reports/data.json"]
    return {n: (root / n).read_bytes() for n in names}


def test_split_is_stable_under_reordering(tmp_path: Path) -> None:
    rows = [_trace(i) for i in range(40)]
    shuffled = rows[:]
    random.Random(7).shuffle(shuffled)
    assert shuffled != rows
    first = _prepare_bytes(tmp_path / "a", rows)
    second = _prepare_bytes(tmp_path / "b", shuffled)
    assert first == second
    train = _read_jsonl(tmp_path / "a" / "data" / "prepared" / "train.jsonl")
    val = _read_jsonl(tmp_path / "a" / "data" / "prepared" / "val.jsonl")
    assert train and val and len(train) + len(val) == 40
    # a problem's side does not depend on which other rows are present
    subset = _prepare_bytes(tmp_path / "c", rows[::2])
    sub_val = {json.loads(x)["id"] for x in subset["data/prepared/val.jsonl"].decode().splitlines()}
    assert sub_val == {r["id"] for r in val} & {r["id"] for r in rows[::2]}


def test_max_train_rows_caps_deterministically(tmp_path: Path) -> None:
    rows = [_trace(i) for i in range(40)]
    full = _prepare_bytes(tmp_path / "full", rows)
    capped = _prepare_bytes(tmp_path / "cap", rows, max_train_rows=5)
    capped_rev = _prepare_bytes(tmp_path / "rev", rows[::-1], max_train_rows=5)
    assert capped == capped_rev
    full_train = full["data/prepared/train.jsonl"].decode().splitlines()
    kept = capped["data/prepared/train.jsonl"].decode().splitlines()
    assert len(kept) == 5 and set(kept) <= set(full_train)
    assert capped["data/prepared/val.jsonl"] == full["data/prepared/val.jsonl"]
    report = json.loads(capped["reports/data.json"])
    assert report["capped"] == len(full_train) - 5
    assert report["rejected"] == 0


# ---------------------------------------------------------------- bundled data


def test_generate_raw_is_byte_reproducible(tmp_path: Path) -> None:
    cfg = GenerateConfig(size=12, seed=3, output="data/raw/gen.jsonl")
    first = generate_raw(cfg, tmp_path / "a").read_bytes()
    second = generate_raw(cfg, tmp_path / "b").read_bytes()
    other = generate_raw(cfg.model_copy(update={"seed": 4}), tmp_path / "c").read_bytes()
    assert first == second
    assert first != other
    rows = [json.loads(line) for line in first.decode("utf-8").splitlines()]
    assert [r["id"] for r in rows] == [f"gsm_symbolic-3-{i}" for i in range(12)]
    for row in rows:
        fields, rejection = validate_row(row)
        assert rejection is None and fields is not None
        last = row["solution"].rstrip().splitlines()[-1]
        assert last.startswith("####") and last[4:].strip() == row["answer"]


def test_generated_data_prepares_end_to_end(tmp_path: Path) -> None:
    generate_raw(GenerateConfig(size=30, seed=1), tmp_path)
    summary = prepare_data(DataConfig(), tmp_path, None, Path("reports"))
    assert summary.read == 30 == summary.accepted + summary.rejected
    assert summary.rejected_by_reason["unverifiable"] == 0
    assert summary.train + summary.val == summary.accepted
    # gsm_symbolic is templated on GSM8K test problems: the overlap check must catch some of them
    assert summary.contamination_removed > 0


def test_load_gsm8k100(gsm8k100: list[Any]) -> None:
    assert len(gsm8k100) == 100
    assert len({t.id for t in gsm8k100}) == 100
    assert gsm8k100 == load_gsm8k100()  # stable ids and order
    for t in gsm8k100:
        assert t.problem and t.source
        last = t.solution.rstrip().splitlines()[-1]
        assert last.startswith("####") and last[4:].strip() == t.answer
        assert normalize_answer(t.answer).lstrip("-").replace(".", "", 1).isdigit()


# ---------------------------------------------------------------- ingest


def test_ingest_adds_each_content_once_and_sorts_out_files(tmp_path: Path) -> None:
    from opsd_core.config import Params
    from opsd_core.data.ingest import ingest

    params = Params()
    source = tmp_path / params.flow.source_dir
    source.mkdir()
    batch = "".join(_line(_trace(i)) + "\n" for i in range(3)) + '{"problem": "no solution"}\n'
    (source / "batch.jsonl").write_text(batch)
    (source / "junk.jsonl").write_text('not json\n\n[1, 2]\n{"problem": "Tom has 3 pens."}\n')

    first = ingest(params, tmp_path)
    stored = tmp_path / params.data.raw_dir / "ingested"
    (copy,) = stored.iterdir()
    assert copy.name.startswith("batch-") and copy.read_text() == batch  # content-addressed, bytes kept
    assert first["added"] == [{"file": "batch.jsonl", "as": copy.relative_to(tmp_path).as_posix(),
                               "valid_rows": 3, "row_problems": 1}]
    assert first["already_ingested"] == []
    assert [r["file"] for r in first["rejected_files"]] == ["junk.jsonl"]
    assert sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()) == [
        "processed/batch.jsonl", "rejected/junk.jsonl", "rejected/junk.reason.txt"]
    reason = (source / "rejected/junk.reason.txt").read_text().splitlines()
    assert reason[0] == "no valid trace rows:"
    assert reason[1].startswith(f"{params.flow.source_dir}/junk.jsonl:1: malformed_json (None): invalid JSON")
    assert reason[2:] == [
        f"{params.flow.source_dir}/junk.jsonl:3: not_an_object (None): row must be a JSON object, got list",
        f"{params.flow.source_dir}/junk.jsonl:4: missing_field (solution): required field 'solution' is missing",
    ]

    (source / "batch.jsonl").write_text(batch)  # the same file delivered again
    (source / "empty.jsonl").write_text("\n")
    second = ingest(params, tmp_path)
    assert second == {"added": [], "already_ingested": ["batch.jsonl"],
                      "rejected_files": [{"file": "empty.jsonl", "problems": []}]}
    assert [p.name for p in stored.iterdir()] == [copy.name]
    assert (source / "processed/batch.jsonl").read_text() == batch
    assert (source / "rejected/empty.reason.txt").read_text() == "no valid trace rows:\nfile holds no rows\n"
    assert ingest(params, tmp_path) == {"added": [], "already_ingested": [], "rejected_files": []}


def test_ingest_adds_the_same_bytes_under_another_name_once(tmp_path: Path) -> None:
    from opsd_core.config import Params
    from opsd_core.data.ingest import ingest

    params = Params()
    source = tmp_path / params.flow.source_dir
    source.mkdir()
    batch = "".join(_line(_trace(i)) + "\n" for i in range(3))
    (source / "monday.jsonl").write_text(batch)
    assert [a["file"] for a in ingest(params, tmp_path)["added"]] == ["monday.jsonl"]
    (source / "tuesday.jsonl").write_text(batch)
    assert ingest(params, tmp_path)["already_ingested"] == ["tuesday.jsonl"]
