"""A fresh clone of this project as a user makes one: the pipeline files, the smoke profile, a git repo."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def fresh_smoke_clone(path: Path, model_cache: Path, with_dvc_config: bool = False) -> Path:
    """``path`` as a new checkout running the smoke profile (models cached in ``model_cache``)."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("params.yaml", "dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, path / name)
    if with_dvc_config:
        shutil.copytree(ROOT / ".dvc", path / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
    tree = yaml.safe_load((path / "params.yaml").read_text())
    tree["profile"] = "smoke"
    tree["model"]["cache_dir"] = str(model_cache)
    (path / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    return path
