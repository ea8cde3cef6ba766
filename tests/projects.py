"""Smoke projects for the tests: a fresh clone as a user makes one, and one reproduced pipeline that several
test files share (running the whole smoke pipeline costs ~45-60 s on a 2-core CI machine, so it runs once).
The fresh clone itself is benchmarks/common.py's (the soak benchmark makes the same one; benchmarks import
nothing from the tests)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import fresh_smoke_clone


def committed_smoke_project(path: Path, model_cache: Path) -> Path:
    """A fresh smoke clone as ``opsd run`` leaves it before its flow (data generated and ``dvc add``-ed),
    committed, so that the lineage's git commit is a real one and the tree is clean."""
    from flows.bootstrap import bootstrap
    from opsd_core.config import load_params

    fresh_smoke_clone(path, model_cache, with_dvc_config=True)
    bootstrap(load_params(path / "params.yaml"), path)
    assert (path / "data/raw.dvc").is_file()
    subprocess.run(["git", "add", "-A"], cwd=path, check=True, capture_output=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "init"], cwd=path,
                   check=True, capture_output=True)
    return path


def registry_state(project: Path) -> dict:
    from opsd_core.config import load_params
    from opsd_core.registry.store import all_versions, open_client, resolve_store, version_by_alias

    params = load_params(project / "params.yaml")
    client = open_client(resolve_store(params, project))
    name = params.registry.model_name
    try:
        versions = all_versions(client, name)
    except Exception:  # noqa: BLE001 - no registered model yet
        versions = []
    champion = version_by_alias(client, name, "champion") if versions else None
    challenger = version_by_alias(client, name, "challenger") if versions else None
    return {
        "versions": versions,
        "champion": champion.version if champion else None,
        "challenger": challenger.version if challenger else None,
        "client": client,
        "params": params,
    }


def git_head(project: Path) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, check=True, capture_output=True,
                          text=True).stdout.strip()


def content_hash(project: Path) -> str:
    return json.loads((project / "models/candidate/opsd_candidate.json").read_text())["content_hash"]


def copy_project(project: Path, dst: Path) -> Path:
    """A copy of a reproduced project (git, DVC cache, MLflow store, checkpoints) to change freely. Its MLflow
    experiment still names the original's artifact folder: runs of the copy put their artifacts there."""
    shutil.copytree(project, dst, symlinks=True)
    return dst


def first_pipeline_run(project: Path) -> dict[str, Any]:
    """The retrain flow on a committed fresh project (on the Prefect server the caller configured), with what
    the tests check it against, taken at the time."""
    from flows.retrain import retrain
    from opsd_core.config import load_params

    flow_state = retrain(str(project / "params.yaml"), return_state=True)
    registry = registry_state(project)
    return {
        "summary": flow_state.result(),
        "flow_run_id": str(flow_state.state_details.flow_run_id),
        "versions": [str(v.version) for v in registry["versions"]],
        "challenger": str(registry["challenger"]),
        "content_hash": content_hash(project),
        "raw_md5": yaml.safe_load((project / "data/raw.dvc").read_text())["outs"][0]["md5"],
        "params_hash": load_params(project / "params.yaml").hash(),
        "data_hash": json.loads((project / "reports/data.json").read_text())["data_hash"],
        "git_commit": git_head(project),
    }
