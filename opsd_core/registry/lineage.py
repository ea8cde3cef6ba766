"""Lineage of a candidate: which code, data, configuration and flow run produced it."""

from __future__ import annotations

import getpass
import os
import subprocess
from pathlib import Path

import yaml

from opsd_core.config import Params
from opsd_core.io import file_hash
from opsd_core.layout import Env, Layout


def git_commit(root: Path) -> tuple[str | None, bool | None]:
    """(HEAD commit, working tree dirty) or (None, None) outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=30)
        if head.returncode != 0:
            return None, None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=30)
        return head.stdout.strip() or None, bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None, None


def dvc_out_md5(dvc_file: Path) -> str | None:
    """The md5 that DVC recorded for the (first) output of a ``.dvc`` file."""
    if not dvc_file.is_file():
        return None
    try:
        meta = yaml.safe_load(dvc_file.read_text()) or {}
        outs = meta.get("outs") or []
        return str(outs[0]["md5"]) if outs and outs[0].get("md5") else None
    except (yaml.YAMLError, AttributeError, KeyError, TypeError, IndexError):
        return None


def file_sha256(path: Path) -> str | None:
    return file_hash(path, 64) if path.is_file() else None


def source_tags(root: Path, name: str) -> dict[str, str]:
    """MLflow's own source tags, which its UI shows as Source, Version and User: ``name`` (the command),
    the git commit of ``root`` when it is a repository, and the user."""
    tags = {"mlflow.source.name": name, "mlflow.source.type": "LOCAL"}
    commit, _ = git_commit(root)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid (some containers)
        pass
    return tags


def collect(params: Params, root: Path, data_hash: str | None = None) -> dict[str, str | None]:
    """Lineage tags (values are strings or None for 'not available here')."""
    commit, dirty = git_commit(root)
    return {
        "git_commit": commit,
        "git_dirty": None if dirty is None else str(dirty).lower(),
        "dvc_raw_md5": dvc_out_md5(Layout.of(params, root).raw_dvc),
        "params_hash": params.hash(),
        "dvc_lock_sha256": file_sha256(root / "dvc.lock"),
        "data_hash": data_hash,
        "flow_run_id": os.environ.get(Env.FLOW_RUN) or None,
        "profile": params.profile,
    }
