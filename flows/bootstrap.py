"""First-run set-up for ``opsd run``: DVC in place; the data version the checkout names pulled, or else the
bundled data generated; versioned."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from flows.dvc import StageError, dvc
from flows.ingest import restore_raw
from opsd_core.config import Params
from opsd_core.data import generate_raw, list_raw_files
from opsd_core.layout import Layout
from opsd_core.registry import decision
from opsd_core.registry.lineage import dvc_out_md5
from opsd_core.registry.store import resolve_store


def bootstrap(params: Params, root: Path) -> dict[str, Any]:
    done: dict[str, Any] = {}
    if not (root / ".dvc").is_dir():
        in_git = subprocess.run(["git", "rev-parse"], cwd=root, capture_output=True).returncode == 0
        dvc(["init", "-q"] if in_git else ["init", "-q", "--no-scm"], root)
        done["dvc_init"] = True
    raw = root / params.data.raw_dir
    raw_dvc = raw.with_name(raw.name + ".dvc")
    named = raw_dvc.read_text() if raw_dvc.is_file() else None  # the data version this checkout names
    wanted = dvc_out_md5(raw_dvc)
    if not list_raw_files(raw):
        why = _pull(params, root) if named else "no data/raw.dvc"
        if why is None:
            done["pulled"] = dvc_out_md5(raw_dvc)
            print(f"opsd run: pulled the data version {raw_dvc.name} names into {raw}", file=sys.stderr)
        else:
            done["generated"] = str(generate_raw(params.data.generate, root))
            print(f"opsd run: generated the bundled dataset into {raw}", file=sys.stderr)
    # versions the raw traces (a no-op when data/raw.dvc already matches them)
    dvc(["add", "-q", params.data.raw_dir], root)
    if "generated" in done and named is not None and raw_dvc.read_text() != named:
        # the checkout names a version this clone could not pull (a team's data): generating the bundled set
        # must not silently replace it
        made = dvc_out_md5(raw_dvc)
        raw_dvc.write_text(named)
        raise StageError(f"{raw_dvc} names the data version {wanted}, which this clone does not have and could "
                         f"not pull ({why}); the bundled data that data.generate makes is version {made}. Make "
                         f"the DVC remote reachable and `dvc pull {raw_dvc.name}`, or `dvc add {params.data.raw_dir}`"
                         " to replace the named version with the bundled one")
    return done


def _pull(params: Params, root: Path) -> str | None:
    """``dvc pull`` the raw data version the checkout names; None when it came, else why not (one line)."""
    try:
        restore_raw(params, root)
    except StageError as err:
        return str(err).splitlines()[0]
    return None if list_raw_files(root / params.data.raw_dir) else "the pull brought no files"


def _shown(path: Path, root: Path) -> str:
    """``path`` as the user types it from ``root``: relative inside the project, absolute outside."""
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _command(name: str, root: Path) -> str:
    """``name`` from this interpreter's environment, as a path that works from ``root`` without activating it."""
    return _shown(Path(sys.executable).parent / name, root)


def print_next_steps(params: Params, root: Path, summary: dict[str, Any], seconds: float | None = None) -> None:
    """The run's last words: what ran and for how long, the gate's decision in sentences, where to look next
    (commands that work as printed, from outside the virtual environment too)."""
    store = resolve_store(params, root)
    layout = Layout.of(params, root)
    ran = summary.get("ran") or []
    reg = summary.get("registry") or {}
    took = f" in {seconds:.0f} s" if seconds is not None else ""
    lines = ["", f"opsd run: done{took}; " + (f"stages run: {', '.join(ran)}" if ran else
                                               "nothing changed, no stage ran")]
    if reg and ran:
        lines.append(f"  gate: {'promoted to champion' if reg.get('promoted') else 'not promoted'} "
                     f"({reg.get('model_name', params.registry.model_name)} v{reg.get('version')})")
        lines += [f"    {sentence}" for sentence in decision.plain_words(reg.get("verdict") or {})]
    ui = f"{_command('mlflow', root)} ui --backend-store-uri {store.tracking_uri}"
    if store.artifact_location:
        ui += f" --default-artifact-root {store.artifact_location}"
    opsd = _command("opsd", root)
    served = store.tracking_uri.startswith(("http://", "https://"))
    link = mlflow_run_link(store.tracking_uri if served else "http://127.0.0.1:5000", reg)
    lines += [f"  reports:   {_shown(layout.reports, root)}/  candidate: {_shown(layout.candidate, root)}",
              f"  champion:  {opsd} status",
              f"  MLflow:    {link}" if served and link else
              f"  MLflow UI: {ui}" + (f"   (then open {link})" if link else ""),
              f"  Prefect:   {opsd} server start   (then open the URL it prints: flow runs, stage logs, artifacts)", ""]
    print("\n".join(lines))


def mlflow_run_link(base: str, reg: dict[str, Any]) -> str | None:
    """The pipeline run's page in MLflow's UI, in its model-training view (MLflow 3 opens a run in its GenAI view
    unless the link says otherwise)."""
    if not (reg.get("experiment_id") and reg.get("run_id")):
        return None
    return f"{base.rstrip('/')}/#/experiments/{reg['experiment_id']}/runs/{reg['run_id']}?workflowType=machine_learning"
