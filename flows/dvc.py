"""The DVC runner: the CLI as a subprocess in the project, the stages it would rerun, the stage list.

DVC's Python API depends on the working directory, so a subprocess is the one safe way to call it
from a long-lived flow process.
"""

from __future__ import annotations

import configparser
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from opsd_core.errors import OpsdError


class StageError(OpsdError):
    """A DVC stage failed; the message holds the tail of its output."""


def dvc(args: list[str], root: Path, env: dict[str, str] | None = None) -> str:
    """Run ``dvc ARGS`` in ``root``; a failure raises :class:`StageError` with the output's tail."""
    run_env = dict(env or os.environ)
    # stage commands call `opsd`: make this interpreter's scripts folder win even when not activated
    run_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), run_env.get("PATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=root, env=run_env, capture_output=True, text=True,
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise StageError(f"`dvc {' '.join(args)}` failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout


def pending_stages(root: Path) -> list[str]:
    """Stages DVC would rerun (``dvc status`` lists only changed ones)."""
    status = json.loads(dvc(["status", "--json"], root) or "{}")
    return [name.split(":")[-1] for name in status if not name.endswith(".dvc")]


def stage_names(root: Path) -> list[str]:
    """The pipeline's stages in ``dvc.yaml``'s order (written in dependency order), so the flow never
    restates the pipeline."""
    path = Path(root) / "dvc.yaml"
    try:
        stages = yaml.safe_load(path.read_text(encoding="utf-8"))["stages"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as err:
        raise StageError(f"{path}: cannot read the pipeline's stages ({err})") from None
    return list(stages)


def has_remote(root: Path) -> bool:
    """Whether DVC has a default remote configured (repo or local config)."""
    parser = configparser.ConfigParser()
    parser.read([root / ".dvc" / "config", root / ".dvc" / "config.local"])
    return any(parser.has_option(s, "remote") for s in parser.sections() if s.strip() == "core")
