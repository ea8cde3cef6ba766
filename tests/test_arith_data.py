"""The generated arithmetic word problems: byte-reproducible, every trace right step by step, the
difficulty doing what it says, and the prepare stage accepting them all."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from opsd_core.config import ConfigError, DataConfig, GenerateConfig, load_params
from opsd_core.data import generate_raw, prepare_data
from opsd_core.data.arithmetic import ArithmeticDifficulty, arithmetic_rows

LINE = re.compile(r"^(\d+) ([+\-*]) (\d+) = (\d+)$")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _config(**over: object) -> GenerateConfig:
    return GenerateConfig(source="arithmetic", size=40, seed=7, output="data/raw/arith.jsonl").model_copy(update=over)


def test_the_same_settings_give_the_same_bytes_and_others_differ(tmp_path: Path) -> None:
    first = generate_raw(_config(), tmp_path / "a").read_bytes()
    assert first == generate_raw(_config(), tmp_path / "b").read_bytes()
    for i, other in enumerate([{"seed": 8}, {"steps": 3}, {"max_number": 99}, {"distractors": 1}]):
        assert generate_raw(_config(**other), tmp_path / f"c{i}").read_bytes() != first
    # pinned: random.Random's integer draws from a string seed are specified across platforms and Python
    # versions, so a user anywhere regenerates this row; it changes only when the generator's code does
    row = json.loads(first.decode("utf-8").splitlines()[0])
    assert row["problem"] == ("Eli has 18 pencils. Then Eli gives away 16 pencils. Then Eli gives away 1 pencils. "
                              "How many pencils does Eli have now?")
    assert row["solution"] == "18 - 16 = 2\n2 - 1 = 1\n#### 1" and row["answer"] == "1"


@pytest.mark.parametrize("difficulty", [ArithmeticDifficulty(1, 20, 0), ArithmeticDifficulty(2, 50, 1),
                                        ArithmeticDifficulty(4, 99, 3)])
def test_every_trace_is_right_step_by_step(difficulty: ArithmeticDifficulty) -> None:
    rows = arithmetic_rows(200, 0, difficulty)
    assert len({r.problem for r in rows}) == 200 and len({r.id for r in rows}) == 200
    for row in rows:
        *steps, final = row.solution.splitlines()
        assert len(steps) == difficulty.steps and final == f"#### {row.answer}"
        first = int(re.search(r"has (\d+) ", row.problem).group(1))
        total = first
        for line in steps:
            a, op, b, c = LINE.match(line).groups()
            assert int(a) == total and OPS[op](int(a), int(b)) == int(c) > 0
            assert b in row.problem or op == "*"  # each operand is stated (multipliers as words)
            total = int(c)
        assert str(total) == row.answer
        # distractors: one sentence each about someone else's other things
        assert row.problem.count(" has ") == 1 + difficulty.distractors
        assert row.problem.endswith("have now?") and row.meta["steps"] == difficulty.steps


def test_numbers_stay_in_range() -> None:
    rows = arithmetic_rows(300, 1, ArithmeticDifficulty(2, 30, 2))
    for row in rows:
        added = [int(m) for m in re.findall(r"(\d+) more", row.problem)]
        assert all(1 <= n <= 30 for n in added)
    assert max(int(r.answer) for r in rows) <= 30 * 3 * 4  # at most a multiplication of a small total


def test_prepare_accepts_every_generated_row(tmp_path: Path) -> None:
    cfg = DataConfig(generate=_config(size=60), val_fraction=0.25)
    generate_raw(cfg.generate, tmp_path)
    summary = prepare_data(cfg, tmp_path, None, Path("reports"))
    assert summary.read == 60 == summary.accepted and summary.rejected == 0
    assert summary.val > 0 and summary.train + summary.val == 60
    train = [json.loads(line) for line in (tmp_path / cfg.prepared_dir / "train.jsonl").read_text().splitlines()]
    assert all(r["source"] == "opsd/arithmetic" for r in train)


def test_impossible_settings_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="cannot draw 50000 distinct problems"):
        arithmetic_rows(50000, 0, ArithmeticDifficulty(1, 2, 0))
    with pytest.raises(ValueError, match="invalid arithmetic difficulty"):
        ArithmeticDifficulty(0, 10, 0)
    with pytest.raises(ConfigError, match="data.generate.source"):
        load_params(None, None, ["data.generate.source=aime"])
