"""A pipeline whose process dies (SIGKILL, OOM, power loss) is noticed and marked FAILED: leases held by
the process, taken back by the next `opsd run` or `opsd status`. The whole story on a real flow (its process
group SIGKILLed, `opsd status` marking the run FAILED, the next run registering once) is part of the main-job
test in tests/test_run_cli.py, which shares its fresh clone and pipeline run."""

from __future__ import annotations

import signal
from pathlib import Path

from mlflow.tracking import MlflowClient

from opsd_core.registry import leases
from tests.support import hold_lease


def test_a_lease_outlives_its_process_only_as_a_dead_one(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert hold_lease(state, "run-a", "die").returncode == -signal.SIGKILL
    assert hold_lease(state, "run-b", "finish").returncode == 0  # released: no lease left behind
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
        assert hold_lease(state, run_id, "die").returncode == -signal.SIGKILL
    reaped = leases.reap(state, client)
    assert [r["run_id"] for r in reaped] == [died]
    assert client.get_run(died).info.status == "FAILED"
    assert "died without finishing" in client.get_run(died).data.tags[leases.FAILURE_TAG]
    assert client.get_run(closed).info.status == "FINISHED"
    assert (state / "runs" / "reaped.jsonl").read_text().count(died) == 1
    assert leases.reap(state, client) == []
