"""The retrain flow: ingest new traces → DVC stages → summary (DESIGN.md sections 1–2).

Prefect decides *when* and *with what guarantees* (retries, a concurrency limit on training,
schedules, flow-run lineage); DVC decides *what* reruns; ``opsd <stage>`` computes. One MLflow run
per pipeline run is opened only when DVC has work to do, and it is marked FAILED when a stage fails,
the process crashes or receives SIGTERM, so a failed pipeline never registers or promotes a model.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, tags, task
from prefect.runtime import flow_run

from flows import artifacts, tracking
from flows.bootstrap import bootstrap, print_next_steps
from flows.console import Console, stage_figure
from flows.dvc import dvc, pending_stages, stage_names
from flows.ingest import ingest_and_track
from flows.locks import training_slot
from opsd_core.config import Params, load_params
from opsd_core.layout import Env, Layout
from opsd_core.registry.lineage import dvc_out_md5
from opsd_core.registry.reach import require_tracking
from opsd_core.registry.store import resolve_store


@task(name="ingest")
def ingest_task(params_path: str, root: str) -> dict[str, Any]:
    # an interrupted ingest (killed during `dvc add` or `dvc push`) is finished by the next run
    result = ingest_and_track(load_params(params_path), Path(root))
    get_run_logger().info("ingest: %s", result)
    if result.get("added"):
        CONSOLE.line(f"ingest: {len(result['added'])} new trace file(s) added: a new data version")
    for bad in result.get("rejected_files") or []:
        CONSOLE.line(f"ingest: {bad['file']} rejected (no valid row; kept in rejected/ with the reason)")
    return result


CONSOLE = Console()
# the report whose figure a stage's "done" line shows
_STAGE_REPORTS: dict[str, Callable[[Layout], Path]] = {
    "prepare": lambda layout: layout.data_report, "train": lambda layout: layout.train_report,
    "evaluate": lambda layout: layout.eval_report, "register": lambda layout: layout.registry_report}


def _stage_report(root: Path, stage: str) -> dict[str, Any] | None:
    report = _STAGE_REPORTS.get(stage)
    if report is None:
        return None
    path = report(Layout.of(load_params(root / "params.yaml"), root))
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


@task(name="stage")
def stage_task(name: str, root: str, env: dict[str, str]) -> bool:
    """``dvc repro`` one stage; True when DVC actually ran it (False: unchanged, skipped)."""
    logger = get_run_logger()
    logger.info("dvc repro %s", name)
    started = time.monotonic()
    CONSOLE.line(f"{name}: running")

    def on_line(line: str) -> None:
        # every line reaches the task run's log in Prefect, whole; the terminal gets progress and warnings
        logger.info("%s | %s", name, line)
        CONSOLE.stage_output(name, line)

    out = dvc(["repro", "--single-item", name], Path(root), env, on_line=on_line)
    ran = f"Running stage '{name}'" in out
    seconds = time.monotonic() - started
    logger.info("%s: %s in %.0f s", name, "done" if ran else "unchanged, skipped", seconds)
    CONSOLE.stage_done(name, ran, seconds, stage_figure(name, _stage_report(Path(root), name)) if ran else "")
    return ran


@task(name="train")
def train_task(root: str, env: dict[str, str], tag: str, limit: int) -> bool:
    # a retry reruns `dvc repro train`, and `opsd train` resumes from its last checkpoint
    with training_slot(tag, limit):
        return stage_task.fn("train", root, env)


@task(name="summary")
def summary_task(root: str, params_path: str, ran: list[str], ingest: dict[str, Any]) -> dict[str, Any]:
    params = load_params(params_path)
    layout = Layout.of(params, Path(root))
    out: dict[str, Any] = {"ran": ran, "ingest": ingest}
    for name, path in (("data", layout.data_report), ("train", layout.train_report),
                       ("registry", layout.registry_report)):
        if path.is_file():
            out[name] = json.loads(path.read_text())
    if ran:  # this run produced results: show them on its Prefect page
        evaluated = layout.eval_report
        out["artifacts"] = artifacts.publish(json.loads(evaluated.read_text()) if evaluated.is_file() else None,
                                             out.get("registry"))
    return out


def run_labels(params: Params, root: Path) -> dict[str, str]:
    """What a flow run is of: the profile, the params hash and the raw data's DVC hash (once versioned)."""
    data = dvc_out_md5(Layout.of(params, root).raw_dvc)
    return {"profile": params.profile, "params": params.hash()[:8],
            **({"data": data.removesuffix(".dir")[:8]} if data else {})}


def run_tags(labels: dict[str, str]) -> list[str]:
    """The labels as Prefect tags: ``opsd``, ``profile:smoke``, ``params:1a2b3c4d``, ``data:...``."""
    return ["opsd", *(f"{k}:{v}" for k, v in labels.items())]


def _run_name() -> str:
    """The flow run's name: ``retrain-<profile>-params<hash>-data<hash>`` (Prefect's default is random words)."""
    params_file = Path(str(flow_run.get_parameters().get("params_path", "params.yaml"))).resolve()
    try:
        labels = run_labels(load_params(params_file), params_file.parent)
    except Exception:  # noqa: BLE001 - a name is no reason to fail the run: the flow reports bad params itself
        return "retrain"
    return "-".join(["retrain", labels.pop("profile"), *(f"{k}{v}" for k, v in labels.items())])


@flow(name="opsd-retrain", log_prints=True, flow_run_name=_run_name)
def retrain(params_path: str = "params.yaml") -> dict[str, Any]:
    """Ingest new traces, then reproduce the DVC pipeline; a no-op when nothing changed. Each stage's task waits
    for the one before it, so the run's graph in Prefect shows ingest → prepare → train → ... → summary."""
    params_file = Path(params_path).resolve()
    root = params_file.parent
    params = load_params(params_file)
    # a worker's run too: a tracking store that does not answer stops it before any data moves
    require_tracking(resolve_store(params, root).tracking_uri)
    ingest_state = ingest_task(str(params_file), str(root), return_state=True)
    ingested = ingest_state.result()
    pending = pending_stages(root)
    if not pending:
        return summary_task(str(root), str(params_file), [], ingested, wait_for=[ingest_state])
    run_id = tracking.start_pipeline_run(params, root, flow_run.get_id())
    env = os.environ.copy()
    env.update({Env.FLOW_RUN: str(flow_run.get_id() or ""), Env.PIPELINE_RUN: run_id})
    ran: list[str] = []
    previous = signal.getsignal(signal.SIGTERM)

    ended = []

    def _on_sigterm(signum: int, frame: Any) -> None:
        tracking.end_pipeline_run(params, root, run_id, "FAILED", "SIGTERM")
        ended.append("SIGTERM")  # the run is closed with its real reason: the exit below must not overwrite it
        raise SystemExit(143)

    if hasattr(signal, "SIGTERM") and _is_main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    upstream = ingest_state
    try:
        for name in stage_names(root):
            if name == "train":
                upstream = train_task.with_options(retries=params.flow.train_retries)(
                    str(root), env, params.flow.concurrency_tag, params.flow.concurrency_limit,
                    return_state=True, wait_for=[upstream])
            else:
                upstream = stage_task.with_options(name=name)(name, str(root), env, return_state=True,
                                                              wait_for=[upstream])
            if upstream.result():  # raises the stage's error
                ran.append(name)
    except BaseException as err:
        if not ended:
            tracking.end_pipeline_run(params, root, run_id, "FAILED", f"{type(err).__name__}: {err}"[:500])
        raise
    finally:
        if _is_main_thread():
            signal.signal(signal.SIGTERM, previous)
    tracking.end_pipeline_run(params, root, run_id, "FINISHED")
    return summary_task(str(root), str(params_file), ran, ingested, wait_for=[upstream])


def _is_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def main_job(params_path: str = "params.yaml") -> int:
    """``opsd run``: bootstrap a fresh clone (data, DVC), run the flow, print where to look."""
    params_file = Path(params_path).resolve()
    params = load_params(params_file)
    started = time.monotonic()
    bootstrap(params, params_file.parent)
    with tags(*run_tags(run_labels(params, params_file.parent))):
        summary = retrain(str(params_file))
    print_next_steps(params, params_file.parent, summary, time.monotonic() - started)
    return 0
