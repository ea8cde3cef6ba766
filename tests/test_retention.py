"""Retention across trainings: the soak (benchmarks/soak.py) found one training's checkpoints left behind by every
scheduled run with new data (each trains under a new run key, and keep_checkpoints bounds one key's folder)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from benchmarks.soak import checks
from opsd_core import checkpoint as ckpt


def _training(root: Path, key: str, steps: int, keep: int = 2) -> Path:
    run_dir = root / key
    for step in range(1, steps + 1):
        ckpt.save(run_dir, step, {"step": step, "w": [float(step)]}, keep)
    return run_dir


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    for p in [path, *path.rglob("*")]:
        os.utime(p, (then, then))


def test_a_finished_training_removes_earlier_trainings_and_keeps_its_own(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    older = [_training(root, f"run{i}", 3) for i in range(3)]  # three earlier scheduled runs
    for path in older:
        _age(path, 3600)
    started = time.time()
    beside = _training(root, "running-beside", 1)  # another training writing since this one started
    current = _training(root, "current", 5)
    removed = ckpt.prune_other_runs(current, started)
    assert sorted(p.name for p in removed) == ["run0", "run1", "run2"]
    assert sorted(p.name for p in root.iterdir()) == ["current", "running-beside"]
    assert [c.step for c in ckpt.complete(current)] == [5, 4]  # keep_checkpoints still applies within it
    assert ckpt.latest(beside) is not None
    assert ckpt.prune_other_runs(current, started) == []  # nothing more to remove


def test_the_soak_flags_checkpoints_beyond_the_setting_and_leftover_leases() -> None:
    def run(folders: int, leases: int = 0) -> dict:
        places = ("dvc_cache", "dvc_remote", "mlflow_db", "mlflow_artifacts", "prefect_home", "audit_log")
        disk = {p: {"bytes": 1000, "files": 1} for p in places}
        disk.update({"checkpoints": {"bytes": 0, "files": 0, "folders": folders, "runs": folders // 2},
                     "run_leases": {"bytes": 0, "files": leases}, "ingest_journal": {"bytes": 0, "files": 0},
                     "tmp_files": {"bytes": 0, "files": 0}, "lock_files": {"bytes": 0, "files": 3}})
        return {"disk": disk}

    assert checks([run(2), run(2), run(2)], keep_checkpoints=2) == []
    flags = checks([run(2), run(4), run(6, leases=1)], keep_checkpoints=2)
    assert flags == ["run 2: 4 checkpoint folders in 2 training runs, more than train.keep_checkpoints=2",
                     "run 3: 6 checkpoint folders in 3 training runs, more than train.keep_checkpoints=2",
                     "run 3: 1 run leases left after the run"]
