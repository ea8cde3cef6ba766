"""The DVC runner: the CLI as a subprocess in the project, the stages it would rerun, the stage list.

DVC's Python API depends on the working directory, so a subprocess is the one safe way to call it
from a long-lived flow process.
"""

from __future__ import annotations

import configparser
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from opsd_core.errors import OpsdError


class StageError(OpsdError):
    """A DVC stage failed; the message holds the tail of its output."""


def dvc(args: list[str], root: Path, env: dict[str, str] | None = None,
        on_line: Callable[[str], None] | None = None) -> str:
    """Run ``dvc ARGS`` in ``root``; a failure raises :class:`StageError` with the output's tail.

    ``on_line``: called with each output line as it is printed (stdout and stderr together), so a long
    stage (training: one line per step) shows its progress while it runs, not when it ends.
    """
    run_env = dict(env or os.environ)
    # stage commands call `opsd`: make this interpreter's scripts folder win even when not activated
    run_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), run_env.get("PATH", "")])
    run_env.setdefault("PYTHONUNBUFFERED", "1")  # the stage's own lines arrive as they are written
    # its own process group: when this process is interrupted (SIGTERM, Ctrl-C, a Prefect cancellation), DVC
    # and the stage it runs (`opsd train` and its torchrun ranks) are stopped with it, never left orphaned
    with subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=root, env=run_env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True) as proc:
        assert proc.stdout is not None
        lines = []
        try:
            for line in proc.stdout:
                lines.append(line)
                if on_line is not None and line.strip():
                    on_line(line.rstrip("\n"))
            code = proc.wait()
        except BaseException:
            _stop_group(proc)
            raise
    out = "".join(lines)
    if code != 0:
        tail = out.strip().splitlines()[-25:]
        # the first line says why (DVC's own last ERROR line), so a one-line report of it is enough to act on
        errors = [line.strip() for line in tail if line.startswith("ERROR")]
        why = errors[-1] if errors else (tail[-1].strip() if tail else "no output")
        raise StageError(f"`dvc {' '.join(args)}` failed (exit {code}): {why[:300]}\n" + "\n".join(tail))
    return out


def _stop_group(proc: subprocess.Popen[str], grace_s: float = 20.0) -> None:
    """SIGTERM the stage's whole process group, SIGKILL what is left after ``grace_s``."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


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
