"""Soak: N smoke pipeline runs (``opsd run``) in one fresh clone, new trace files between runs, disk measured.

After every run it records the bytes and files under each place the pipeline writes to (checkpoints, DVC cache
and remote, MLflow database and artifacts, Prefect home, lock and lease files, temporary files) and reports the
growth per run. It flags what grows beyond a retention setting: checkpoint folders beyond
``train.keep_checkpoints`` (one training's worth), lease or journal files left after a run, lock files that
multiply, temporary files left behind; and, for the stores that keep one entry per run by design (DVC cache,
MLflow, Prefect's database, the audit log), growth per run that itself keeps growing (the last third of the
runs adding more than 1.5 times what the first third did).

    python -m benchmarks.soak --runs 8 [--out benchmarks/results/soak-<date>.json] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = str(Path(sys.executable).parent)


def _tree(path: Path, pattern: str = "*") -> tuple[int, int]:
    """(bytes, files) under ``path`` matching ``pattern`` (0, 0 if absent)."""
    if path.is_file():
        return path.stat().st_size, 1
    if not path.is_dir():
        return 0, 0
    files = [p for p in path.rglob(pattern) if p.is_file() and not p.is_symlink()]
    return sum(p.stat().st_size for p in files), len(files)


def measure(project: Path, lock_dir: Path) -> dict[str, dict[str, int]]:
    """Bytes and files in each place the pipeline writes to."""
    state = project / ".opsd"
    places = {
        "checkpoints": _tree(state / "checkpoints"),
        "dvc_cache": _tree(project / ".dvc" / "cache"),
        "dvc_remote": _tree(state / "dvc-remote"),
        "mlflow_db": _tree(state / "mlflow.db"),
        "mlflow_artifacts": _tree(state / "mlartifacts"),
        "prefect_home": _tree(state / "prefect"),
        "audit_log": _tree(state / "audit.jsonl"),
        "model_cache": _tree(state / "models"),
        "run_leases": _tree(state / "runs", "*.lease"),
        "ingest_journal": _tree(state / "ingest.pending"),
        "lock_files": (sum(_tree(p)[0] for p in _locks(project, lock_dir)), len(_locks(project, lock_dir))),
        "tmp_files": _tree(project, "*.tmp"),
        "project_total": _tree(project),
    }
    out = {name: {"bytes": b, "files": n} for name, (b, n) in places.items()}
    ckpt = state / "checkpoints"
    out["checkpoints"]["folders"] = len([p for p in ckpt.glob("*/step-*") if p.is_dir()]) if ckpt.is_dir() else 0
    out["checkpoints"]["runs"] = len([p for p in ckpt.iterdir() if p.is_dir()]) if ckpt.is_dir() else 0
    return out


def _locks(project: Path, lock_dir: Path) -> list[Path]:
    found = [*lock_dir.glob("*.lock"), *(project / ".opsd").glob("*.lock"), *(project / ".dvc" / "tmp").glob("*lock*")]
    return [p for p in found if p.is_file()]


def new_traces(run: int) -> str:
    rows = [{"problem": f"Ann has {i} pens and gets {i + run} more. How many pens does Ann have now?",
             "solution": f"{i} + {i + run} = {2 * i + run}\n#### {2 * i + run}", "answer": str(2 * i + run)}
            for i in range(3 + 10 * run, 13 + 10 * run)]
    return "".join(json.dumps(r) + "\n" for r in rows)


def checks(rows: list[dict[str, Any]], keep_checkpoints: int) -> list[str]:
    """What grew beyond the retention settings (empty: nothing). Pure: over the per-run measurements."""
    flags = []
    for i, row in enumerate(rows, 1):
        m = row["disk"]
        if m["checkpoints"]["folders"] > keep_checkpoints:
            flags.append(f"run {i}: {m['checkpoints']['folders']} checkpoint folders in {m['checkpoints']['runs']} "
                         f"training runs, more than train.keep_checkpoints={keep_checkpoints}")
        for place in ("run_leases", "ingest_journal", "tmp_files"):
            if m[place]["files"]:
                flags.append(f"run {i}: {m[place]['files']} {place.replace('_', ' ')} left after the run")
        if m["lock_files"]["files"] > rows[0]["disk"]["lock_files"]["files"]:
            flags.append(f"run {i}: {m['lock_files']['files']} lock files (run 1 left {rows[0]['disk']['lock_files']['files']})")
    third = len(rows) // 3
    if third >= 1:
        for place in ("dvc_cache", "dvc_remote", "mlflow_db", "mlflow_artifacts", "prefect_home", "audit_log"):
            growth = [b["disk"][place]["bytes"] - a["disk"][place]["bytes"] for a, b in zip(rows, rows[1:], strict=False)]
            early, late = growth[:third], growth[-third:]
            if early and late and sum(late) / len(late) > 1.5 * max(sum(early) / len(early), 4096):
                flags.append(f"{place}: growth per run rising ({sum(early) / len(early) / 1e6:.2f} MB early, "
                             f"{sum(late) / len(late) / 1e6:.2f} MB late)")
    return flags


def _opsd(project: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=1800)


def soak(runs: int, work: Path) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import fresh_smoke_clone
    from opsd_core.offline import apply_offline_defaults

    apply_offline_defaults()
    project = fresh_smoke_clone(work / "clone", work / "clone" / ".opsd" / "models", with_dvc_config=True)
    lock_dir = work / "locks"
    env = {**os.environ, "PATH": os.pathsep.join([BIN, os.environ.get("PATH", "")]), "OPSD_LOCK_DIR": str(lock_dir)}
    env.pop("PREFECT_HOME", None)  # the default: Prefect's home inside the project, measured with it
    from opsd_core.config import load_params

    keep = load_params(project / "params.yaml").train.keep_checkpoints
    rows: list[dict[str, Any]] = []
    for i in range(1, runs + 1):
        if i > 1:  # new traces arrive between scheduled runs
            (project / "incoming").mkdir(exist_ok=True)
            (project / "incoming" / f"traces-{i:03d}.jsonl").write_text(new_traces(i))
        started = time.monotonic()
        done = _opsd(project, env, "run")
        wall = time.monotonic() - started
        if done.returncode != 0:
            raise SystemExit(f"run {i} failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
        ran = next((line.split(":", 1)[1].strip() for line in done.stdout.splitlines()
                    if line.startswith("stages run:")), "")
        rows.append({"run": i, "wall_s": round(wall, 1), "stages_run": ran, "disk": measure(project, lock_dir)})
        d = rows[-1]["disk"]
        print(f"run {i}: {wall:5.1f} s  ckpt {d['checkpoints']['bytes'] / 1e6:6.2f} MB ({d['checkpoints']['folders']} "
              f"folders)  dvc cache {d['dvc_cache']['bytes'] / 1e6:6.2f} MB  mlflow {d['mlflow_artifacts']['bytes'] / 1e6:6.2f}"
              f"+{d['mlflow_db']['bytes'] / 1e6:.2f} MB  prefect {d['prefect_home']['bytes'] / 1e6:6.2f} MB  "
              f"locks {d['lock_files']['files']}  leases {d['run_leases']['files']}", flush=True)
    return {"runs": rows, "keep_checkpoints": keep, "flags": checks(rows, keep), "growth_per_run": growth(rows)}


def growth(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean bytes added per run after the first, for each place."""
    if len(rows) < 2:
        return {}
    first, last = rows[0]["disk"], rows[-1]["disk"]
    return {place: round((last[place]["bytes"] - first[place]["bytes"]) / (len(rows) - 1)) for place in first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / f"{date.today()}-soak.json")
    ap.add_argument("--keep", action="store_true", help="keep the temporary project (its path is printed)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="opsd-soak-"))
    started = time.monotonic()
    try:
        result = soak(args.runs, work)
    finally:
        if args.keep:
            print(f"project kept in {work / 'clone'}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    result["total_s"] = round(time.monotonic() - started)
    result["command"] = f"python -m benchmarks.soak --runs {args.runs}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"growth per run (bytes): {json.dumps(result['growth_per_run'])}")
    print("flags: " + ("; ".join(result["flags"]) if result["flags"] else "none"))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
