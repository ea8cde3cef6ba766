"""Scheduled retraining for real: `opsd deploy` with a one-minute cron starts the project's own Prefect
server (with its scheduler), serves the retrain flow, and a scheduled run fires and completes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows import server
from tests.projects import fresh_smoke_clone
from tests.test_run_cli import BIN, opsd


def test_server_start_status_stop(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert server.status(state) is None
    record = server.start(state)
    try:
        assert not record["already_running"] and record["url"].startswith("http://127.0.0.1:")
        assert server.healthy(record["url"]) and server.status(state)["pid"] == record["pid"]
        assert server.start(state)["already_running"] is True  # found again, not started twice
        assert (state / "prefect" / "prefect.db").is_file()  # its history lives in the project
    finally:
        assert server.stop(state)["url"] == record["url"]
    assert not server.healthy(record["url"]) and server.status(state) is None
    assert server.stop(state) is None


def test_a_minutely_deployment_fires_and_completes(tmp_path: Path) -> None:
    project = fresh_smoke_clone(tmp_path / "p", tmp_path / "models")
    generated = opsd(project, "data", "generate")
    assert generated.returncode == 0, generated.stderr[-2000:]
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=project, check=True)

    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    env["PATH"] = os.pathsep.join([BIN, env.get("PATH", "")])
    served = subprocess.Popen([sys.executable, "-m", "flows.cli", "deploy", "--cron", "* * * * *", "--name", "minutely"],
                              cwd=project, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=open(tmp_path / "deploy.log", "w"))  # noqa: SIM115
    state = project / ".opsd"
    try:
        deadline = time.monotonic() + 420
        completed = None
        while completed is None:
            assert served.poll() is None, (tmp_path / "deploy.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "deploy.log").read_text()[-3000:]
            record = server.status(state)
            if record is not None:
                with temporary_settings(updates={PREFECT_API_URL: record["api_url"]}), \
                        get_client(sync_client=True) as client:
                    runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
                        name=DeploymentFilterName(any_=["minutely"])))
                assert not any(r.state and r.state.is_failed() for r in runs), [r.state for r in runs]
                completed = next((r for r in runs if r.state and r.state.is_completed()), None)
            time.sleep(2)  # polling the server for the scheduled run's state
        assert completed.auto_scheduled  # created by the scheduler from the cron, not by hand
        assert (project / "reports" / "registry.json").is_file()  # the whole pipeline ran
    finally:
        os.killpg(served.pid, signal.SIGTERM)
        served.wait(timeout=60)
        stopped = server.stop(state)
    assert stopped is not None and not server.healthy(stopped["url"])
