"""A pipeline whose process dies (SIGKILL, OOM, power loss) is noticed and marked FAILED: leases held by
the process, taken back by the next `opsd run` or `opsd status`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from opsd_core.config import load_params
from opsd_core.registry import leases
from opsd_core.registry.store import resolve_store
from tests.projects import fresh_smoke_clone
from tests.test_run_cli import BIN, opsd

HOLD_AND_DIE = """
import os, signal, sys
from pathlib import Path
from opsd_core.registry import leases
lease = leases.hold(Path(sys.argv[1]), sys.argv[2])
print("held", flush=True)
if sys.argv[3] == "die":
    os.kill(os.getpid(), signal.SIGKILL)
lease.release()
"""


def _run(state: Path, run_id: str, how: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", HOLD_AND_DIE, str(state), run_id, how], capture_output=True,
                          text=True, timeout=120)


def test_a_lease_outlives_its_process_only_as_a_dead_one(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert _run(state, "run-a", "die").returncode == -signal.SIGKILL
    assert _run(state, "run-b", "finish").returncode == 0  # released: no lease left behind
    live = leases.hold(state, "run-c")  # this process is alive and holds it
    dead = leases.dead_leases(state)
    assert [d["run_id"] for d in dead] == ["run-a"] and dead[0]["pid"] > 0
    assert leases.dead_leases(state) == []  # taken back once
    assert live.path.is_file()
    live.release()
    assert not live.path.exists()


def test_reap_marks_only_runs_still_marked_running(tmp_path: Path) -> None:
    state = tmp_path / "state"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    died, closed = (client.create_run(experiment).info.run_id for _ in range(2))
    client.set_terminated(closed, status="FINISHED")
    for run_id in (died, closed):
        assert _run(state, run_id, "die").returncode == -signal.SIGKILL
    reaped = leases.reap(state, client)
    assert [r["run_id"] for r in reaped] == [died]
    assert client.get_run(died).info.status == "FAILED"
    assert "died without finishing" in client.get_run(died).data.tags[leases.FAILURE_TAG]
    assert client.get_run(closed).info.status == "FINISHED"
    assert (state / "runs" / "reaped.jsonl").read_text().count(died) == 1
    assert leases.reap(state, client) == []


def test_a_sigkilled_flow_is_marked_failed_and_the_next_run_recovers(tmp_path: Path) -> None:
    project = fresh_smoke_clone(tmp_path / "p", tmp_path / "models")
    params = load_params(project / "params.yaml")
    store = resolve_store(params, project)

    env = {**os.environ, "PATH": os.pathsep.join([BIN, os.environ.get("PATH", "")])}
    env.pop("PREFECT_HOME")  # the default: Prefect's history inside the project, not in ~/.prefect
    flow = subprocess.Popen([sys.executable, "-m", "flows.cli", "run"], cwd=project, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(leases.lease_dir(store.state_dir).glob("*.lease")):  # the pipeline run has started
        assert flow.poll() is None, "the flow ended before its pipeline run started"
        assert time.monotonic() < deadline, "no pipeline run started within 300 s"
        time.sleep(0.2)
    os.killpg(flow.pid, signal.SIGKILL)  # the flow and everything it started, with no cleanup
    flow.wait(timeout=60)
    runs = MlflowClient(store.tracking_uri).search_runs(
        [e.experiment_id for e in MlflowClient(store.tracking_uri).search_experiments()])
    assert [r.info.status for r in runs] == ["RUNNING"]  # what a crash leaves behind
    assert (project / ".opsd" / "prefect" / "prefect.db").is_file()

    status = opsd(project, "status")
    assert status.returncode == 0, status.stderr[-2000:]
    assert f"pipeline run {runs[0].info.run_id} marked FAILED" in status.stdout
    client = MlflowClient(store.tracking_uri)
    assert client.get_run(runs[0].info.run_id).info.status == "FAILED"

    again = opsd(project, "run")
    assert again.returncode == 0, again.stderr[-4000:]
    assert "stages run:" in again.stdout and "register" in again.stdout
    # the killed run registered nothing; the next one registered its candidate once
    assert len(client.search_model_versions(f"name='{params.registry.model_name}'")) == 1
    statuses = sorted(r.info.status for r in client.search_runs(runs[0].info.experiment_id))
    assert statuses == ["FAILED", "FINISHED"]
