"""`opsd deploy`: the retrain flow registered with a cron schedule, read back through the client."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client

from flows.deploy import deploy

pytestmark = pytest.mark.slow  # Prefect and an `opsd deploy` subprocess: out of the fast lane (make test-fast)

ROOT = Path(__file__).resolve().parents[1]


def test_deploy_registers_the_cron_schedule(tmp_path: Path, prefect_harness: None) -> None:
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    assert deploy(str(tmp_path / "params.yaml"), None, None, "17 3 * * 1", "weekly", register_only=True) == 0
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("opsd-retrain/weekly")
    assert deployment.parameters == {"params_path": str(tmp_path / "params.yaml")}
    crons = [s.schedule.cron for s in deployment.schedules]
    assert crons == ["17 3 * * 1"]
    assert all(s.active for s in deployment.schedules)


def test_a_bad_cron_is_one_line_before_any_server_starts(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "deploy", "--cron", "not a cron"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "opsd: --cron 'not a cron' is not a cron expression (five fields: minute hour day month weekday, "
        'e.g. "0 3 * * 1" for Mondays at 03:00)']
    assert time.perf_counter() - start < 60  # no Prefect server was started (that alone takes 9-20 s)
