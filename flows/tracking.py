"""The pipeline's MLflow run: opened by the flow, used by ``opsd register``, closed with a status.

The flow passes the run id to its stages as ``OPSD_MLFLOW_RUN_ID``; the register stage logs into
that run instead of opening its own, so one pipeline run is one MLflow run.
"""

from __future__ import annotations

from pathlib import Path

from opsd_core.config import Params
from opsd_core.registry.lineage import collect
from opsd_core.registry.store import ensure_experiment, open_client, resolve_store


def start_pipeline_run(params: Params, root: Path, flow_run_id: str | None) -> str:
    store = resolve_store(params, root)
    client = open_client(store)
    experiment = ensure_experiment(client, store, params.registry.experiment)
    tags = {f"lineage.{k}": str(v) for k, v in collect(params, root).items() if v is not None}
    tags.update({"opsd.pipeline": "retrain", "opsd.profile": params.profile})
    if flow_run_id:
        tags["lineage.flow_run_id"] = str(flow_run_id)
    run = client.create_run(experiment, tags=tags, run_name=f"retrain-{params.profile}")
    return run.info.run_id


def end_pipeline_run(params: Params, root: Path, run_id: str, status: str, reason: str | None = None) -> None:
    client = open_client(resolve_store(params, root))
    if reason:
        client.set_tag(run_id, "opsd.failure", reason)
    client.set_terminated(run_id, status=status)
