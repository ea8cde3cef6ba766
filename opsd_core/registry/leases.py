"""Pipeline-run leases: which MLflow pipeline runs have a live process behind them.

A running pipeline holds an exclusive ``flock`` on ``<state>/runs/<run id>.lease`` (JSON: run id, pid,
host, start time). The operating system drops the lock when the process ends, however it ends (exit,
SIGKILL, the OOM killer, a reboot), so a lease whose lock can be taken belongs to a pipeline that died
without closing its run. :func:`reap` marks such runs FAILED with that reason; the next pipeline run
and ``opsd status`` call it. Ownership, not a timeout: a slow run is never declared dead. Scope: the
processes that share the state folder on one machine (``flock`` is not reliable over NFS).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from opsd_core.io import atomic_write

FAILURE_TAG = "opsd.failure"


@dataclass
class Lease:
    path: Path
    handle: IO[str]

    def release(self) -> None:
        """The run ended and recorded its own status: drop the lease."""
        self.path.unlink(missing_ok=True)
        self.handle.close()  # closing releases the lock


def lease_dir(state: Path) -> Path:
    return Path(state) / "runs"


def hold(state: Path, run_id: str) -> Lease:
    """Take the lease of ``run_id`` for this process's lifetime (or until :meth:`Lease.release`)."""
    folder = lease_dir(state)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{run_id}.lease"
    tmp = folder / f".{run_id}.{os.getpid()}.tmp"
    # locked before it carries its final name: a reaper never sees an unlocked live lease
    handle = open(tmp, "w+", encoding="utf-8")  # noqa: SIM115 (held for the run's lifetime)
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    handle.write(json.dumps({"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
    handle.flush()
    tmp.rename(final)
    return Lease(final, handle)


def dead_leases(state: Path) -> list[dict[str, Any]]:
    """The leases no live process holds (each read, then removed); the caller marks their runs."""
    found = []
    folder = lease_dir(state)
    for path in sorted(folder.glob("*.lease")) if folder.is_dir() else []:
        with open(path, "r+", encoding="utf-8") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its pipeline is alive
            try:
                record = json.loads(fh.read() or "{}")
            except json.JSONDecodeError:
                record = {}
            record.setdefault("run_id", path.stem)
            found.append(record)
            path.unlink(missing_ok=True)
    return found


def any_dead(state: Path) -> bool:
    """Whether a lease no live process holds is there, left in place for :func:`reap` (which needs MLflow:
    ``opsd status`` imports it only then)."""
    folder = lease_dir(state)
    for path in folder.glob("*.lease") if folder.is_dir() else []:
        try:
            with open(path, encoding="utf-8") as fh:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when closed
        except (BlockingIOError, FileNotFoundError):  # its pipeline is alive, or it just ended
            continue
        return True
    return False


def reap(state: Path, client: Any) -> list[dict[str, Any]]:
    """Mark every pipeline run whose process died as FAILED (tag ``opsd.failure`` says why); returns them.

    ``client``: an ``MlflowClient``. A run already terminated (its process ended it before dying) is left
    as it is. The record of each reaped run is appended to ``<state>/runs/reaped.jsonl``.
    """
    reaped = []
    for lease in dead_leases(state):
        run_id = lease["run_id"]
        try:
            status = client.get_run(run_id).info.status
        except Exception:  # noqa: BLE001 (a run deleted meanwhile: nothing to mark)
            continue
        if status != "RUNNING":
            continue
        reason = (f"the pipeline process (pid {lease.get('pid')} on {lease.get('host')}, started "
                  f"{lease.get('started')}) died without finishing (SIGKILL, out of memory or power loss); "
                  "found by the next opsd run/status")
        client.set_tag(run_id, FAILURE_TAG, reason)
        client.set_terminated(run_id, status="FAILED")
        entry = {**lease, "reason": reason, "reaped": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        log = lease_dir(state) / "reaped.jsonl"
        previous = log.read_text(encoding="utf-8") if log.is_file() else ""
        atomic_write(log, previous + json.dumps(entry, sort_keys=True) + "\n")
        reaped.append(entry)
    return reaped
