"""The flow run's Prefect page: the evaluation table and the gate's decision as Markdown artifacts,
read back through Prefect's own client."""

from __future__ import annotations

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
from prefect.runtime import flow_run

from flows.artifacts import eval_table, mlflow_link, publish
from opsd_core.config import Params
from opsd_core.registry import decide
from tests.support import GUARD, PRIMARY, eval_report

pytestmark = pytest.mark.slow  # Prefect flows on the test harness: out of the fast lane (make test-fast)


def test_eval_table_has_a_row_per_task_with_the_interval() -> None:
    report = eval_report(cand=30)
    table = eval_table(report).splitlines()
    assert table[0].startswith("| task | base | candidate | candidate - base | 95% CI |")
    row = next(line for line in table if line.startswith(f"| {PRIMARY} |"))
    diff = report["tasks"][PRIMARY]["diff"]
    assert f"{diff['mean_diff']:+.4f}" in row and f"[{diff['ci_low']:+.4f}, {diff['ci_high']:+.4f}]" in row
    assert any(line.startswith(f"| {GUARD} |") for line in table) and len(table) == 4


@pytest.mark.usefixtures("prefect_harness")
def test_a_run_publishes_the_eval_table_and_the_gate_decision() -> None:
    report = eval_report(cand=30)
    verdict = decide(report, Params().registry, None, "new")
    registry = {"model_name": "opsd-model", "version": "3", "verdict": verdict}

    @flow(name="artifacts-under-test")
    def run() -> tuple[list[str], str]:
        return publish(report, registry), flow_run.get_id()

    keys, run_id = run()
    assert keys == ["opsd-eval", "opsd-gate"]
    # the harness is shared by the worker's test files: other pipeline runs publish under the same keys,
    # so read back only this flow run's artifacts
    with get_client(sync_client=True) as client:
        found = {a.key: a for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["opsd-eval", "opsd-gate"]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))}
    assert set(found) == {"opsd-eval", "opsd-gate"}
    assert found["opsd-eval"].data == eval_table(report)
    gate = found["opsd-gate"].data
    assert "**Model opsd-model version 3**" in gate and "promote to champion" in gate
    assert f"| vs base: {PRIMARY} |" in gate


@pytest.mark.usefixtures("prefect_harness")
def test_nothing_is_published_without_results() -> None:
    @flow(name="artifacts-none")
    def run() -> list[str]:
        return publish(None, {"model_name": "m"})

    assert run() == []


def test_the_gate_artifact_points_at_the_mlflow_run() -> None:
    served = {"run_id": "r1", "experiment_id": "4", "tracking_uri": "http://mlflow.internal:5000/"}
    assert mlflow_link(served) == "MLflow run: [r1](http://mlflow.internal:5000/#/experiments/4/runs/r1)\n\n"
    local = {"run_id": "r1", "experiment_id": "4", "tracking_uri": "sqlite:////p/.opsd/mlflow.db"}
    assert "`r1`" in mlflow_link(local) and "mlflow ui --backend-store-uri sqlite:////p/.opsd/mlflow.db" in mlflow_link(local)
    assert mlflow_link({"verdict": {}}) == ""
