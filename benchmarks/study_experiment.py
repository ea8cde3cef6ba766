"""One row of the OPSD study (benchmarks/opsd_study.py) as a DVC experiment: `dvc exp show` lists the rows.

The row is named by the ``study`` section of ``benchmarks/study/params.yaml`` (model, difficulty, seed, arm, the
work folder where cells keep their trained models and per-arm results); the stage in
``benchmarks/study/dvc.yaml`` runs it and writes the cell (``cell.json``) and the arm's numbers
(``metrics.json``: accuracies, the gain over the arm's reference with its 95% interval, the self-teacher gap
before training). A row whose arm the work folder already holds is read back, not retrained (the study
resumes per arm), so the rows of a study run earlier become experiments in seconds:

    dvc exp run benchmarks/study/dvc.yaml -S benchmarks/study/params.yaml:study.arm=opsd_after_sft \\
        -S benchmarks/study/params.yaml:study.seed=1 -S benchmarks/study/params.yaml:study.steps=3
    dvc exp show --only-changed
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from benchmarks.opsd_study import ARMS, SIZES, run_cell
from opsd_core.backends.capabilities import apply_isa_cap
from opsd_core.data.arithmetic import ArithmeticDifficulty
from opsd_core.io import atomic_write
from opsd_core.offline import apply_offline_defaults


@dataclass(frozen=True)
class StudyRow:
    model: str  # bundled | tiny
    difficulty: ArithmeticDifficulty
    seed: int
    arm: str
    work: Path
    threads: int | None = None

    @classmethod
    def load(cls, path: Path) -> StudyRow:
        """The ``study`` section of ``path``; a bad value is named with the file and the key."""
        tree = (yaml.safe_load(path.read_text()) or {}).get("study")
        if not isinstance(tree, dict):
            raise ValueError(f"{path}: no `study:` section")
        allowed = {"model": sorted(SIZES), "arm": list(ARMS)}
        for key, choices in allowed.items():
            if tree.get(key) not in choices:
                raise ValueError(f"{path}: study.{key} is {tree.get(key)!r}, expected one of {choices}")
        for key in ("steps", "max_number", "distractors", "seed"):
            if not isinstance(tree.get(key), int) or tree[key] < 0:
                raise ValueError(f"{path}: study.{key} is {tree.get(key)!r}, expected a whole number")
        threads = tree.get("threads")
        return cls(tree["model"], ArithmeticDifficulty(tree["steps"], tree["max_number"], tree["distractors"]),
                   tree["seed"], tree["arm"], Path(tree.get("work") or ".opsd/study"),
                   int(threads) if threads else None)


def row_metrics(cell: dict[str, Any], arm: str) -> dict[str, float]:
    """The arm's numbers as DVC metrics (numbers only): accuracies, gain over its reference, the gap."""
    run = cell["runs"][arm]
    out = {"strict": run["strict"], "flex": run["flex"]}
    gain = (run.get("gain") or {}).get("flex")
    if gain:
        out.update({"gain_flex": gain["mean_diff"], "gain_ci_low": gain["ci_low"], "gain_ci_high": gain["ci_high"]})
    gap = (run.get("diagnosis") or {}).get("accuracy_gap")
    if gap is not None:
        out["gap_before"] = gap
    return out


def main(argv: list[str] | None = None) -> int:
    apply_isa_cap()
    apply_offline_defaults()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=Path("benchmarks/study/params.yaml"))
    parser.add_argument("--cell", type=Path, required=True, help="the whole cell's results (JSON)")
    parser.add_argument("--metrics", type=Path, required=True, help="the arm's numbers (DVC metrics)")
    args = parser.parse_args(argv)
    row = StudyRow.load(args.params)
    if row.threads:
        import torch

        torch.set_num_threads(row.threads)
    cell = run_cell(row.model, row.difficulty, row.seed, ["base", row.arm], row.work, row.threads)
    atomic_write(args.cell, json.dumps({"model": row.model, "sizes": SIZES[row.model], "cells": [cell]}, indent=2))
    metrics = row_metrics(cell, row.arm)
    atomic_write(args.metrics, json.dumps(metrics, indent=2, sort_keys=True))
    print(json.dumps({"row": {"difficulty": row.difficulty.label, "seed": row.seed, "arm": row.arm}, **metrics}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
