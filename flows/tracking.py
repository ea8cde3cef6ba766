"""The pipeline's MLflow run: opened by the flow, used by ``opsd register``, closed with a status.

The flow passes the run id to its stages as ``OPSD_MLFLOW_RUN_ID``; the register stage logs into
that run instead of opening its own, so one pipeline run is one MLflow run. While it runs, this process
holds the run's lease (:mod:`opsd_core.registry.leases`); a run whose process died without closing it
is marked FAILED by the next pipeline run (or ``opsd status``) before anything else happens.
"""

from __future__ import annotations

from pathlib import Path

from opsd_core.config import Params
from opsd_core.registry import leases
from opsd_core.registry.lineage import collect, source_tags
from opsd_core.registry.store import ensure_experiment, open_client, resolve_store

_HELD: dict[str, leases.Lease] = {}


def start_pipeline_run(params: Params, root: Path, flow_run_id: str | None) -> str:
    store = resolve_store(params, root)
    client = open_client(store)
    for dead in leases.reap(store.state_dir, client):
        print(f"opsd run: pipeline run {dead['run_id']} marked FAILED: {dead['reason']}")
    experiment = ensure_experiment(client, store, params.registry.experiment)
    tags = {f"lineage.{k}": str(v) for k, v in collect(params, root).items() if v is not None}
    tags.update({"opsd.pipeline": "retrain", "opsd.profile": params.profile, **source_tags(root, "opsd run")})
    if flow_run_id:
        tags["lineage.flow_run_id"] = str(flow_run_id)
    run = client.create_run(experiment, tags=tags, run_name=f"retrain-{params.profile}")
    _HELD[run.info.run_id] = leases.hold(store.state_dir, run.info.run_id)
    return run.info.run_id


def end_pipeline_run(params: Params, root: Path, run_id: str, status: str, reason: str | None = None) -> None:
    client = open_client(resolve_store(params, root))
    if reason:
        client.set_tag(run_id, leases.FAILURE_TAG, reason)
    client.set_terminated(run_id, status=status)
    lease = _HELD.pop(run_id, None)
    if lease is not None:  # released only once the run's own status is recorded
        lease.release()
