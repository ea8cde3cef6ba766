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
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from flows import artifacts, tracking
from flows.bootstrap import bootstrap, print_next_steps
from flows.dvc import dvc, pending_stages, stage_names
from flows.ingest import ingest_and_track
from flows.locks import training_slot
from opsd_core.config import load_params
from opsd_core.layout import Env, Layout


@task(name="ingest")
def ingest_task(params_path: str, root: str) -> dict[str, Any]:
    # an interrupted ingest (killed during `dvc add` or `dvc push`) is finished by the next run
    result = ingest_and_track(load_params(params_path), Path(root))
    get_run_logger().info("ingest: %s", result)
    return result


@task(name="stage")
def stage_task(name: str, root: str, env: dict[str, str]) -> bool:
    """``dvc repro`` one stage; True when DVC actually ran it (False: unchanged, skipped)."""
    logger = get_run_logger()
    logger.info("dvc repro %s", name)
    started = time.monotonic()
    # every line of the stage reaches the Prefect log (and, through its console handler, the terminal)
    # as it is printed: the trainer's per-step lines, the evaluation's progress
    out = dvc(["repro", "--single-item", name], Path(root), env, on_line=lambda line: logger.info("%s | %s", name, line))
    ran = f"Running stage '{name}'" in out
    logger.info("%s: %s in %.0f s", name, "done" if ran else "unchanged, skipped", time.monotonic() - started)
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


@flow(name="opsd-retrain", log_prints=True)
def retrain(params_path: str = "params.yaml") -> dict[str, Any]:
    """Ingest new traces, then reproduce the DVC pipeline; a no-op when nothing changed."""
    params_file = Path(params_path).resolve()
    root = params_file.parent
    params = load_params(params_file)
    ingested = ingest_task(str(params_file), str(root))
    pending = pending_stages(root)
    if not pending:
        return summary_task(str(root), str(params_file), [], ingested)
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
    try:
        for name in stage_names(root):
            if name == "train":
                executed = train_task.with_options(retries=params.flow.train_retries)(
                    str(root), env, params.flow.concurrency_tag, params.flow.concurrency_limit
                )
            else:
                executed = stage_task.with_options(name=name)(name, str(root), env)
            if executed:
                ran.append(name)
    except BaseException as err:
        if not ended:
            tracking.end_pipeline_run(params, root, run_id, "FAILED", f"{type(err).__name__}: {err}"[:500])
        raise
    finally:
        if _is_main_thread():
            signal.signal(signal.SIGTERM, previous)
    tracking.end_pipeline_run(params, root, run_id, "FINISHED")
    return summary_task(str(root), str(params_file), ran, ingested)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def main_job(params_path: str = "params.yaml") -> int:
    """``opsd run``: bootstrap a fresh clone (data, DVC), run the flow, print where to look."""
    params_file = Path(params_path).resolve()
    params = load_params(params_file)
    bootstrap(params, params_file.parent)
    summary = retrain(str(params_file))
    print_next_steps(params, params_file.parent, summary)
    return 0
