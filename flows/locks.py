"""A training slot: at most N trainings at once on this machine (and on a Prefect server's pool).

Locally a file lock in a per-user folder serialises the user's trainings across projects and processes
(the ephemeral Prefect server of one process cannot see another's). The folder is private (mode 0700:
``$XDG_RUNTIME_DIR/opsd-locks``, else ``~/.cache/opsd/locks``; ``OPSD_LOCK_DIR`` overrides), never a
world-writable temporary folder where another user could plant or hold the lock files. When a Prefect
server is configured, a global concurrency limit named after the tag is taken as well.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency

from opsd_core.layout import Env


def lock_dir() -> Path:
    if os.environ.get(Env.LOCK_DIR):
        path = Path(os.environ[Env.LOCK_DIR])
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "opsd-locks"
    else:
        path = Path.home() / ".cache" / "opsd" / "locks"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077 and path.stat().st_uid == os.getuid():
        path.chmod(0o700)  # made before opsd did this (or under a loose umask): close it
    return path


@contextmanager
def machine_slot(tag: str, limit: int, poll_s: float = 0.5) -> Iterator[int]:
    """Hold one of ``limit`` lock files named after ``tag``; blocks until one is free."""
    handles = [open(lock_dir() / f"{tag}.{i}.lock", "a+") for i in range(limit)]  # noqa: SIM115
    try:
        while True:
            for i, fh in enumerate(handles):
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                try:
                    yield i
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)
                return
            time.sleep(poll_s)  # waiting for another training to finish, not to paper over a race
    finally:
        for fh in handles:
            fh.close()


def _server_limit(tag: str, limit: int):  # type: ignore[no-untyped-def]
    if not os.environ.get("PREFECT_API_URL"):
        return nullcontext()
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(tag)
        except Exception:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=tag, limit=limit))
    return concurrency(tag, occupy=1)


@contextmanager
def training_slot(tag: str, limit: int) -> Iterator[None]:
    with machine_slot(tag, limit), _server_limit(tag, limit):
        yield
