"""The OPSD study harness (benchmarks/opsd_study.py) on the tiny model: every arm trains from the right
starting model, is scored on a test split disjoint from its training problems, and compared with its reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.opsd_study import (
    AFTER_SFT,
    REFERENCE,
    across_seeds,
    arm_project,
    merge,
    run_cell,
    split_rows,
    table,
)
from opsd_core.data.arithmetic import ArithmeticDifficulty

pytestmark = pytest.mark.slow


def test_every_arm_runs_from_its_start_and_is_compared(tmp_path: Path) -> None:
    arms = ["base", "sft", "opsd_after_sft", "contrast_after_sft", "mix"]
    cell = run_cell("tiny", ArithmeticDifficulty(1, 9, 0), 0, arms, tmp_path)
    runs = cell["runs"]
    assert set(runs) == set(arms) and cell["test_problems"] == 16 and cell["train_problems"] == 24
    for arm in arms:
        assert 0.0 <= runs[arm]["strict"] <= runs[arm]["flex"] <= 1.0  # a '#### N' answer's last number is N
    for arm in arms[1:]:
        assert runs[arm]["vs"] == REFERENCE[arm] == ("sft" if arm in (*AFTER_SFT, "mix") else "base")
        assert runs[arm]["gain"]["flex"]["ci_low"] <= runs[arm]["gain"]["flex"]["mean_diff"] \
            <= runs[arm]["gain"]["flex"]["ci_high"]
    sft_model = str(tmp_path / "s1-n9-d0-seed0" / "sft-model")
    assert f"model.base={sft_model}" in runs["opsd_after_sft"]["set"]
    assert "opsd.contrast=shuffled" in runs["contrast_after_sft"]["set"]
    assert not any(s.startswith("model.base=" + sft_model) for s in runs["mix"]["set"])
    assert "train.objective=mix" in runs["mix"]["set"] and runs["mix"]["diagnosis"]["problems"] > 0
    assert len(table([cell]).splitlines()) == 2 + len(arms)


def test_a_stopped_study_resumes_where_it_stopped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each arm's result is kept as it lands; a rerun reuses the arms done with the same settings and trains only
    the rest; the base model's scores are shared by the seeds of a difficulty."""
    difficulty = ArithmeticDifficulty(1, 9, 0)
    first = run_cell("tiny", difficulty, 0, ["base", "sft", "opsd_after_sft"], tmp_path)
    cache = json.loads((tmp_path / "s1-n9-d0-base.json").read_text())
    assert len(cache) == first["test_problems"]
    assert "base: scoring 16 problems" in capsys.readouterr().out
    again = run_cell("tiny", difficulty, 0, ["base", "sft", "opsd_after_sft", "more_sft"], tmp_path)
    said = capsys.readouterr().out
    assert "sft: reused" in said and "opsd_after_sft: reused" in said and "more_sft: reused" not in said
    assert "more_sft: strict" in said and "base: scoring 0 problems" in said  # nothing scored twice
    for arm in ("base", "sft", "opsd_after_sft"):
        assert again["runs"][arm] == first["runs"][arm]
    assert again["runs"]["more_sft"]["vs"] == "sft"
    other = run_cell("tiny", difficulty, 1, ["base"], tmp_path)  # another seed: only its new test problems
    grown = json.loads((tmp_path / "s1-n9-d0-base.json").read_text())
    assert set(cache) <= set(grown) and other["test_problems"] == 16


def test_a_killed_arm_keeps_its_checkpoints_for_the_same_problems(tmp_path: Path) -> None:
    """An arm's folder is reused when it holds the same training problems (its checkpoints resume the arm) and
    wiped when the problems differ (a checkpoint of other data must not survive, even if its key would refuse it)."""
    rows, _ = split_rows("tiny", ArithmeticDifficulty(1, 9, 0), 0)
    other, _ = split_rows("tiny", ArithmeticDifficulty(1, 9, 0), 1)
    folder = arm_project(tmp_path / "mix", rows)
    kept = folder / ".opsd/checkpoints/run/step-8.pt"
    kept.parent.mkdir(parents=True)
    kept.write_text("state")
    assert arm_project(tmp_path / "mix", rows) == folder and kept.read_text() == "state"
    assert len((folder / "data/prepared/train.jsonl").read_text().splitlines()) == len(rows)
    arm_project(tmp_path / "mix", other)
    assert not kept.exists()
    assert (folder / "data/prepared/train.jsonl").read_text() == "".join(r.to_json_line() for r in other)


def test_the_test_split_is_disjoint_from_training_and_the_same_for_every_seed() -> None:
    difficulty = ArithmeticDifficulty(2, 50, 0)
    train0, test0 = split_rows("bundled", difficulty, 0)
    train1, test1 = split_rows("bundled", difficulty, 1)
    assert len(test0) == 200 and len(train0) == 256
    assert not {r.problem for r in train0} & {r.problem for r in test0}
    assert {r.problem for r in train0} != {r.problem for r in train1}
    # the shared draw differs only where a seed's training set took a problem
    assert len({r.problem for r in test0} & {r.problem for r in test1}) >= 190


def test_results_run_side_by_side_merge_into_one_table(tmp_path: Path) -> None:
    def cell(seed: int, low: float) -> dict:
        gain = {"mean_diff": low + 0.02, "ci_low": low, "ci_high": low + 0.04}
        return {"difficulty": "s2-n50-d0", "seed": seed, "runs": {
            "sft": {"strict": 0.4, "flex": 0.4, "vs": "base", "gain": {"strict": gain, "flex": gain}},
            "base": {"strict": 0.0, "flex": 0.02}}}
    paths = []
    for seed, low in ((0, 0.01), (1, -0.01)):
        paths.append(tmp_path / f"s{seed}.json")
        paths[-1].write_text(json.dumps({"model": "bundled", "sizes": [1], "cells": [cell(seed, low)]}))
    text = merge(paths, tmp_path / "all.json")
    assert [c["seed"] for c in json.loads((tmp_path / "all.json").read_text())["cells"]] == [0, 1]
    assert "| s2-n50-d0 | sft | base | 2 | 0.400 | +0.030 [+0.010, +0.050]; +0.010 [-0.010, +0.030] | 1/2 |" in text
    assert across_seeds([cell(0, 0.01)]).count("\n") == 3  # header, rule, sft, base
    # the doc's table: points, the study's arm order, a missing seed named, a row whose intervals all lie below
    rows = across_seeds([cell(0, 0.01), cell(1, -0.01)], points=True).splitlines()
    assert rows[2] == "| 2:50:0 | base |  | 0.020 |  |  |"
    assert rows[3] == "| 2:50:0 | sft | base | 0.400 | +3.0 [+1.0, +5.0]; +1.0 [-1.0, +3.0]; (seed 2 not run) | 1/2 |"
    assert across_seeds([cell(0, -0.07)], points=True).splitlines()[3].endswith("| 0/1, all < 0 |")
    later = cell(0, 0.05)
    later["runs"] = {"mix": later["runs"]["sft"]}  # an arm run afterwards for the same cell
    paths.append(tmp_path / "later.json")
    paths[-1].write_text(json.dumps({"model": "bundled", "sizes": [1], "cells": [later]}))
    merge(paths, tmp_path / "all.json")
    cells = json.loads((tmp_path / "all.json").read_text())["cells"]
    assert [c["seed"] for c in cells] == [0, 1] and set(cells[0]["runs"]) == {"sft", "base", "mix"}
    assert cells[0]["runs"]["sft"]["gain"]["flex"]["ci_low"] == 0.01 and set(cells[1]["runs"]) == {"sft", "base"}
