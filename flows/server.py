"""``opsd server start|stop|status``: the project's own persistent Prefect server, for schedules.

Prefect's temporary server (what ``opsd run`` uses) lives as long as one process and runs no scheduler,
so a deployment's cron never fires there. This server keeps its database under the project's state
folder (``<state>/prefect``), listens on 127.0.0.1 only, runs Prefect's scheduler, and is found again by
``opsd deploy`` and ``opsd run`` through ``<state>/prefect-server.json`` (its pid, URL and log file).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from opsd_core.errors import OpsdError
from opsd_core.io import write_json
from opsd_core.net import answers, free_port

STATE_FILE = "prefect-server.json"


class ServerError(OpsdError):
    """The project's Prefect server could not be started or reached."""


# training slots' leases in files under PREFECT_HOME: kept in memory (Prefect's default), a slot held while the
# server restarts is never given back, and every later training waits for it (docs/team-servers.md)
LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"


def prefect_home(state: Path) -> Path:
    """Where the project's Prefect history lives: this server's database and ``opsd run``'s runs."""
    return (Path(state) / "prefect").resolve()


def _record_path(state: Path) -> Path:
    return Path(state) / STATE_FILE


def healthy(url: str, timeout: float = 2.0) -> bool:
    return answers(f"{url}/api/health", timeout)


def status(state: Path) -> dict[str, Any] | None:
    """The running server's record, or None (a record whose server is gone is removed)."""
    path = _record_path(state)
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    if healthy(record["url"]):
        return record
    path.unlink(missing_ok=True)
    return None


def start(state: Path, timeout_s: float = 180.0, scheduler_loop_s: int = 10) -> dict[str, Any]:
    """Start the server (or return the one already running); blocks until it answers."""
    running = status(state)
    if running is not None:
        return {**running, "already_running": True}
    state = Path(state).resolve()
    home = prefect_home(state)
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           # a new deployment's first runs are scheduled within seconds, not at the default minute
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": str(scheduler_loop_s),
           # the UI calls the API at port 4200 unless told where it is; its built files go to the project's
           # state folder (the package's own folder may not be writable)
           "PREFECT_UI_API_URL": f"{url}/api", "PREFECT_UI_STATIC_DIRECTORY": str(home / "ui"),
           "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": LEASE_STORAGE}
    env.pop("PREFECT_API_URL", None)
    log = state / "prefect-server.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port), "--scheduler"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while not healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise ServerError(f"the Prefect server did not come up on {url} (log {log}):\n{tail}")
        time.sleep(0.5)  # waiting for the server to answer its health check
    record = {"pid": proc.pid, "url": url, "api_url": f"{url}/api", "home": str(home), "log": str(log)}
    write_json(_record_path(state), record)
    return {**record, "already_running": False}


def stop(state: Path, timeout_s: float = 30.0) -> dict[str, Any] | None:
    """Stop the server if one runs; returns its record, or None."""
    path = _record_path(state)
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    try:
        os.killpg(record["pid"], signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout_s
    while healthy(record["url"], timeout=0.5) and time.monotonic() < deadline:
        time.sleep(0.2)
    if healthy(record["url"], timeout=0.5):
        os.killpg(record["pid"], signal.SIGKILL)
    path.unlink(missing_ok=True)
    return record
