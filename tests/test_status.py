"""`opsd status` without MLflow in the common case: the aliases and tags read from the SQLite store itself
(opsd_core/registry/sqlite_read.py) answer as MlflowClient does on a real store, and a dead pipeline run
still sends status through MLflow to mark it FAILED."""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from opsd_core.config import load_params
from opsd_core.registry import leases, sqlite_read
from opsd_core.registry.store import resolve_store, version_by_alias
from tests.support import ROOT, hold_lease

pytestmark = pytest.mark.slow  # `opsd status` in subprocesses: out of the fast lane (make test-fast)

ALIASES = ("champion", "challenger", "retired", "nothing")


@pytest.fixture(scope="module")
def registry_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite store as a few registrations leave it: versions with tags, aliases, a deleted version, a second
    model. Built once (creating a store costs ~5 s); each test works on its own copy."""
    folder = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("e", artifact_location=(folder / "art").as_uri())
    for name in ("opsd-model", "other-model"):
        client.create_registered_model(name)
    for i in range(1, 5):
        run = client.create_run(experiment).info.run_id
        client.create_model_version("opsd-model", f"runs:/{run}/model", run_id=run,
                                    tags={"content_hash": f"h{i}", "base_model": "tiny", "lineage.params_hash": f"p{i}",
                                          "score.opsd_val.candidate": str(i / 10)})
    client.create_model_version("other-model", "file:///x", tags={"content_hash": "other"})
    client.set_registered_model_alias("opsd-model", "champion", "2")
    client.set_registered_model_alias("opsd-model", "challenger", "4")
    client.set_registered_model_alias("opsd-model", "retired", "3")
    client.set_registered_model_alias("other-model", "champion", "1")
    client.delete_model_version("opsd-model", "3")  # its alias goes with it
    return folder / "mlflow.db"


def _copy(db: Path, dst: Path) -> tuple[str, MlflowClient]:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(db, dst)
    uri = f"sqlite:///{dst}"
    return uri, MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_aliases_and_tags_read_as_mlflow_reads_them(registry_db: Path, tmp_path: Path) -> None:
    uri, client = _copy(registry_db, tmp_path / "mlflow.db")
    conn = sqlite_read.open_store(uri)
    assert conn is not None  # the pinned MLflow's schema is one this module knows: status takes the fast path
    for name in ("opsd-model", "other-model", "no-such-model"):
        for alias in ALIASES:
            ours = sqlite_read.version_by_alias(conn, name, alias)
            theirs = version_by_alias(client, name, alias)
            if theirs is None:
                assert ours is None, (name, alias)
                continue
            assert ours is not None, (name, alias)
            assert (ours.version, ours.run_id, ours.tags) == (str(theirs.version), theirs.run_id, theirs.tags)
    assert sqlite_read.version_by_alias(conn, "opsd-model", "challenger").tags["content_hash"] == "h4"
    assert sqlite_read.read_aliases(uri, "opsd-model", ALIASES) == {  # what status calls: the same answers
        alias: sqlite_read.version_by_alias(conn, "opsd-model", alias) for alias in ALIASES}
    with pytest.raises(sqlite3.OperationalError, match="readonly"):  # reading can never write the store
        conn.execute("DELETE FROM registered_model_aliases")
    conn.close()


def test_other_stores_and_schemas_are_left_to_mlflow(registry_db: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"sqlite:///{registry_db}"
    assert sqlite_read.open_store(uri) is not None
    for other in ("sqlite:///:memory:", "http://127.0.0.1:5000", f"file://{tmp_path}/mlruns",
                  f"sqlite:///{tmp_path / 'missing.db'}"):
        assert sqlite_read.open_store(other) is None, other
        assert sqlite_read.read_aliases(other, "opsd-model", ALIASES) is None, other
    assert not (tmp_path / "missing.db").exists()  # asking created nothing
    moved = tmp_path / "moved.db"
    shutil.copy(registry_db, moved)
    with sqlite3.connect(moved) as conn:  # a store migrated by a newer MLflow than the one the reads were checked on
        conn.execute("UPDATE alembic_version SET version_num = 'ffffffffffff'")
    assert sqlite_read.open_store(f"sqlite:///{moved}") is None
    monkeypatch.setenv("MLFLOW_WORKSPACE", "team-a")  # which rows a client sees is MLflow's call
    assert sqlite_read.open_store(uri) is None


def _status(project: Path) -> tuple[list[str], bool]:
    """`opsd status` in its own process: its lines, and whether it imported MLflow."""
    code = ("import sys; from flows.cli import main; rc = main(['status']); "
            "print('MLFLOW' if 'mlflow' in sys.modules else 'NO-MLFLOW', rc)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, timeout=300)
    lines = proc.stdout.strip().splitlines()
    assert lines and lines[-1].endswith(" 0"), proc.stdout + proc.stderr[-2000:]
    return lines[:-1], lines[-1].startswith("MLFLOW")


def test_status_without_mlflow_then_through_it_to_mark_a_dead_run(registry_db: Path, tmp_path: Path) -> None:
    project = tmp_path / "p"
    project.mkdir()
    shutil.copy(ROOT / "params.yaml", project / "params.yaml")
    store = resolve_store(load_params(project / "params.yaml"), project)
    _, client = _copy(registry_db, Path(store.tracking_uri.removeprefix("sqlite:///")))
    running = client.create_run(client.get_experiment_by_name("e").experiment_id).info.run_id

    fast, imported = _status(project)
    assert not imported  # nothing to mark: the store's rows, read without MLflow
    assert "champion  : v2  h2  base tiny" in fast and "challenger: v4  h4  base tiny" in fast, fast

    assert hold_lease(store.state_dir, running, "die").returncode == -signal.SIGKILL  # its pipeline died
    assert leases.any_dead(store.state_dir) and leases.any_dead(store.state_dir)  # looking takes nothing back
    slow, imported = _status(project)
    assert imported  # marking the run FAILED is MLflow's job
    reaped = [line for line in slow if line.startswith(f"pipeline run {running} marked FAILED")]
    assert len(reaped) == 1 and client.get_run(running).info.status == "FAILED"
    assert [line for line in slow if line not in reaped] == fast  # both ways read the same
    assert not leases.any_dead(store.state_dir)
    assert _status(project) == (fast, False)  # taken back once: the fast path again
