"""An ingest whose `dvc add`, then whose `dvc push`, is SIGKILLed half-way; the next run finishes the work.

Real DVC in a temporary git repository with a local remote; the crash comes from tests/faults (the dvc
process kills itself right after moving its N-th object into the cache or the remote).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opsd_core.config import Params
from tests.faults import kill_dvc_after_writes
from tests.support import INGEST_CALLER

REPO = Path(__file__).resolve().parents[1]
PARAMS = Params()
pytestmark = pytest.mark.slow  # dvc add / push subprocesses killed half-way: out of the fast lane (make test-fast)

def _dvc(root: Path, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, check=True, capture_output=True,
                          text=True).stdout


def _run(root: Path, fault: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(fault or {})}
    if fault:
        env["PYTHONPATH"] = fault["PYTHONPATH"] + os.pathsep + str(REPO)
    return subprocess.run([sys.executable, "-c", INGEST_CALLER, str(root)], env=env, capture_output=True, text=True,
                          timeout=120)


def _trace(i: int) -> str:
    row = {"id": f"t{i}", "problem": f"What is {i} + {i}?", "solution": f"{i} + {i} = {2 * i}\n#### {2 * i}",
           "answer": str(2 * i)}
    return json.dumps(row) + "\n"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    _dvc(root, "init", "-q")
    _dvc(root, "remote", "add", "-d", "local", str(tmp_path / "remote"))
    raw = root / PARAMS.data.raw_dir
    raw.mkdir(parents=True)
    (raw / "seed.jsonl").write_text(_trace(0))
    incoming = root / PARAMS.flow.source_dir
    incoming.mkdir()
    for i in range(1, 5):
        (incoming / f"batch{i}.jsonl").write_text(_trace(i) + _trace(10 * i))
    return root


def test_an_interrupted_dvc_add_then_push_is_finished_by_the_next_run(project: Path, tmp_path: Path) -> None:
    remote, cache = tmp_path / "remote", project / ".dvc" / "cache"
    # 1. `dvc add` dies after moving one object into the cache: the files are ingested, not yet tracked
    first = _run(project, kill_dvc_after_writes(cache, 1))
    assert first.returncode == 1 and first.stderr.strip().startswith("`dvc add data/raw` failed (exit -9)")
    assert (project / ".opsd" / "ingest.pending").is_file()
    assert sorted(p.name for p in (project / "incoming" / "processed").iterdir()) == [
        f"batch{i}.jsonl" for i in range(1, 5)]  # nothing left to ingest: only the journal remembers
    # 2. the next run redoes `dvc add`; its `dvc push` dies after one object reached the remote
    second = _run(project, kill_dvc_after_writes(remote, 1))
    assert second.returncode == 1 and "`dvc push" in second.stderr and "failed (exit -9)" in second.stderr
    assert (project / ".opsd" / "ingest.pending").is_file()
    assert len([p for p in remote.rglob("*") if p.is_file() and not p.name.endswith(".tmp")]) == 1
    # 3. the next run finishes: tracked, pushed, journal gone
    third = _run(project)
    assert third.returncode == 0, third.stderr
    result = json.loads(third.stdout)
    assert result["added"] == [] and result["pushed"] and result["finished_interrupted_ingest"]
    assert not (project / ".opsd" / "ingest.pending").exists()

    ingested = sorted((project / "data" / "raw" / "ingested").iterdir())
    assert len(ingested) == 4 and not any(p.name.endswith(".tmp") for p in ingested)  # each file once
    assert "up to date" in _dvc(project, "status", "data/raw.dvc").lower()
    assert "in sync" in _dvc(project, "status", "-c", "data/raw.dvc").lower()
    # every object the .dvc file needs is in the remote with the right content (not only present)
    listing = json.loads(next(p for p in remote.rglob("*.dir")).read_text())
    assert len(listing) == 5
    for entry in listing:
        obj = remote / "files" / "md5" / entry["md5"][:2] / entry["md5"][2:]
        assert hashlib.md5(obj.read_bytes()).hexdigest() == entry["md5"]

    # a run with nothing new does no DVC work at all
    fourth = _run(project)
    assert fourth.returncode == 0 and json.loads(fourth.stdout) == {"added": [], "already_ingested": [],
                                                                   "rejected_files": []}
