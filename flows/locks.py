"""A training slot: at most N trainings at once on this machine (and on a Prefect server's pool).

Locally a file lock in a machine-wide folder serialises trainings across projects and processes
(the ephemeral Prefect server of one process cannot see another's). When a Prefect server is
configured, a global concurrency limit named after the tag is taken as well.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path


def lock_dir() -> Path:
    path = Path(os.environ.get("OPSD_LOCK_DIR", Path(tempfile.gettempdir()) / "opsd-locks"))
    path.mkdir(parents=True, exist_ok=True)
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
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency

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
