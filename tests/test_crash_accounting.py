"""A pipeline whose process dies (SIGKILL, OOM, power loss) is noticed and marked FAILED: leases held by
the process, taken back by the next `opsd run` or `opsd status`. The whole story on a real flow (its process
group SIGKILLed, `opsd status` marking the run FAILED, the next run registering once) is part of the main-job
test in tests/test_run_cli.py, which shares its fresh clone and pipeline run."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from opsd_core.registry import leases

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
