"""Scheduled retraining for real: `opsd deploy` with a one-minute cron starts the project's own Prefect
server (with its scheduler), serves the retrain flow, and a scheduled run fires and completes; the server's
start, status and stop (`opsd server ...`) are checked on that same server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterName,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows import server
from tests.projects import copy_project
from tests.support import BIN

pytestmark = pytest.mark.slow  # a Prefect server and a scheduled flow run: out of the fast lane (make test-fast)


def test_a_minutely_deployment_fires_and_completes(tmp_path: Path, smoke_project: Path,
                                                  smoke_first_run: dict[str, Any]) -> None:
    # the session's reproduced pipeline (conftest.py) with the register stage's report gone: the scheduled run
    # has real DVC work to do (`dvc repro` running `opsd register` from the served flow) without training and
    # evaluating again, which tests/test_pipeline.py and test_run_cli.py prove; the schedule is what this proves
    project = copy_project(smoke_project, tmp_path / "p")
    (project / "reports" / "registry.json").unlink()
    state = project / ".opsd"
    assert server.status(state) is None

    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    env["PATH"] = os.pathsep.join([BIN, env.get("PATH", "")])
    served = subprocess.Popen([sys.executable, "-m", "flows.cli", "deploy", "--cron", "* * * * *", "--name", "minutely"],
                              cwd=project, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=open(tmp_path / "deploy.log", "w"))  # noqa: SIM115
    try:
        deadline = time.monotonic() + 420
        completed, tasks = None, []
        while completed is None:
            assert served.poll() is None, (tmp_path / "deploy.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "deploy.log").read_text()[-3000:]
            time.sleep(2)  # polling the server for the scheduled run's state
            record = server.status(state)
            if record is None:
                continue
            with temporary_settings(updates={PREFECT_API_URL: record["api_url"]}), \
                    get_client(sync_client=True) as client:
                runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
                    name=DeploymentFilterName(any_=["minutely"])))
                completed = next((r for r in runs if r.state and r.state.is_completed()), None)
                if completed is not None:
                    tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[completed.id])))
            assert not any(r.state and r.state.is_failed() for r in runs), [r.state for r in runs]
        assert completed.auto_scheduled  # created by the scheduler from the cron, not by hand
        # the flow ran the stale stage through DVC and `opsd register`, which wrote its report again
        assert [t.name.split("-")[0] for t in tasks if t.state and t.state.is_completed()].count("register") == 1
        assert (project / "reports" / "registry.json").is_file()

        # `opsd server start|status|stop` manage the server deploy started (checked here, where a server is
        # started anyway: each start costs ~8 s): found again, not started twice, its history in the project
        log = (tmp_path / "deploy.log").read_text()
        assert f"Prefect server at {record['url']} (started; " in log, log[-3000:]  # none was running before
        assert record["url"].startswith("http://127.0.0.1:") and server.healthy(record["url"])
        # the URL it prints opens the UI, and the UI calls this server's API (not Prefect's default port 4200)
        with urllib.request.urlopen(record["url"] + "/", timeout=30) as page:  # noqa: S310 (loopback)
            assert page.status == 200 and "<html" in page.read().decode().lower()
        with urllib.request.urlopen(record["url"] + "/ui-settings", timeout=30) as page:  # noqa: S310
            assert json.loads(page.read())["api_url"] == record["api_url"]
        again = server.start(state)
        assert again["already_running"] is True and again["pid"] == record["pid"]
        assert (state / "prefect" / "prefect.db").is_file()
    finally:
        os.killpg(served.pid, signal.SIGTERM)
        served.wait(timeout=60)
        stopped = server.stop(state)
    assert stopped is not None and stopped["url"] == record["url"] and not server.healthy(stopped["url"])
    assert server.status(state) is None and server.stop(state) is None
