"""The training slot (flows/locks.py) for real: lock files on this machine, and a global concurrency limit on
a Prefect server (the session's temporary one) when one is configured."""

from __future__ import annotations

import fcntl
import uuid
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound

from flows.locks import machine_slot, training_slot


def _held(path: Path) -> bool:
    """Whether another holder has the lock file: this open file cannot take it."""
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


def _server_limit(tag: str):  # type: ignore[no-untyped-def]
    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(tag)


@pytest.fixture
def locks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OPSD_LOCK_DIR", str(tmp_path / "locks"))
    return tmp_path / "locks"


def test_machine_slots_hand_out_free_slots_and_free_them_on_exit(locks: Path) -> None:
    with machine_slot("t", 2) as first:
        assert first == 0 and _held(locks / "t.0.lock") and not _held(locks / "t.1.lock")
        with machine_slot("t", 2) as second:  # the other slot, while the first is held
            assert second == 1 and _held(locks / "t.1.lock")
        assert not _held(locks / "t.1.lock")
    assert not _held(locks / "t.0.lock")
    with pytest.raises(RuntimeError, match="inside"), machine_slot("t", 1):
        assert _held(locks / "t.0.lock")
        raise RuntimeError("inside")  # a failed training frees its slot too
    assert not _held(locks / "t.0.lock")


def test_training_slot_takes_the_configured_server_limit(locks: Path, prefect_harness: None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.settings import PREFECT_API_URL

    tag = f"opsd-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with training_slot(tag, 2):  # no server configured in the environment: the lock file only
        assert _held(locks / f"{tag}.0.lock")
    with pytest.raises(ObjectNotFound):
        _server_limit(tag)

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    with training_slot(tag, 2):
        created = _server_limit(tag)
        assert (created.limit, created.active_slots) == (2, 1)
        assert _held(locks / f"{tag}.0.lock")
        with training_slot(tag, 2):  # a second training fits in a limit of 2
            assert _server_limit(tag).active_slots == 2 and _held(locks / f"{tag}.1.lock")
        assert _server_limit(tag).active_slots == 1
    released = _server_limit(tag)
    assert (released.id, released.limit, released.active_slots) == (created.id, 2, 0)
    assert not _held(locks / f"{tag}.0.lock")
    with training_slot(tag, 2):  # taken again after the release, on the same limit
        again = _server_limit(tag)
        assert (again.id, again.active_slots) == (created.id, 1)
    assert _server_limit(tag).active_slots == 0
