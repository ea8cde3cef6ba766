"""First-run set-up for ``opsd run``: DVC in place, bundled data generated and versioned."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from flows.dvc import dvc
from opsd_core.config import Params
from opsd_core.data import generate_raw, list_raw_files
from opsd_core.registry import decision
from opsd_core.registry.store import resolve_store


def bootstrap(params: Params, root: Path) -> dict[str, Any]:
    done: dict[str, Any] = {}
    if not (root / ".dvc").is_dir():
        in_git = subprocess.run(["git", "rev-parse"], cwd=root, capture_output=True).returncode == 0
        dvc(["init", "-q"] if in_git else ["init", "-q", "--no-scm"], root)
        done["dvc_init"] = True
    raw = root / params.data.raw_dir
    if not list_raw_files(raw):
        done["generated"] = str(generate_raw(params.data.generate, root))
        print(f"opsd run: generated the bundled dataset into {raw}", file=sys.stderr)
    # versions the raw traces (a no-op when data/raw.dvc already matches them)
    dvc(["add", "-q", params.data.raw_dir], root)
    return done


def print_next_steps(params: Params, root: Path, summary: dict[str, Any]) -> None:
    store = resolve_store(params, root)
    ran = summary.get("ran") or []
    reg = summary.get("registry") or {}
    lines = [
        "",
        f"opsd run: {'stages run: ' + ', '.join(ran) if ran else 'nothing changed; no stage ran'}",
        f"  reports:   {root / params.train.reports_dir}/ (data.json, train.json, train_curve.csv, eval.json, registry.json)",
        f"  candidate: {root / params.train.output_dir}",
    ]
    if reg:
        lines.append(f"  registry:  model {reg.get('model_name', params.registry.model_name)!r} version "
                     f"{reg.get('version')} promoted={reg.get('promoted')}")
        if reg.get("verdict"):
            lines += ["", *(f"  {row}" for row in decision.render(reg["verdict"]).splitlines())]
    ui = f"mlflow ui --backend-store-uri {store.tracking_uri}"
    if store.artifact_location:
        ui += f" --default-artifact-root {store.artifact_location}"
    prefect_home = os.environ.get("PREFECT_HOME", "~/.prefect")
    lines += [f"  MLflow UI: {ui}",
              f"  Prefect:   PREFECT_HOME={prefect_home} prefect server start  (flow runs, stage logs, the "
              "opsd-eval and opsd-gate artifacts)",
              "  champion:  opsd status", ""]
    print("\n".join(lines))
