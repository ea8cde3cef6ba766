"""Where the training-slot locks live: a private per-user folder, never a world-writable one."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from flows.locks import lock_dir, machine_slot


@pytest.mark.parametrize("source", ["runtime", "home"])
def test_lock_folder_is_private_to_the_user(source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPSD_LOCK_DIR", raising=False)
    if source == "runtime":
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
        expected = tmp_path / "run" / "opsd-locks"
    else:
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        expected = tmp_path / "home" / ".cache" / "opsd" / "locks"
    path = lock_dir()
    assert path == expected
    assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0  # no access for group or others
    with machine_slot("t", 1) as slot:
        assert slot == 0 and (path / "t.0.lock").is_file()
