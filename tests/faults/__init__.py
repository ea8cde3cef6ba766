"""Fault injection for the crash-and-resume tests: no hook in opsd, a start-up file in the test process."""

from __future__ import annotations

import os
from pathlib import Path

FAULTS = os.path.dirname(os.path.abspath(__file__))


def kill_after_checkpoint(step: int) -> dict[str, str]:
    """Environment for an opsd subprocess that SIGKILLs itself right after the step-``step`` checkpoint
    (``sitecustomize.py`` beside this file; every process of a torchrun launch inherits it)."""
    path = os.pathsep.join(p for p in (FAULTS, os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "OPSD_TEST_KILL_AFTER_CHECKPOINT": str(step)}


def kill_once_after_checkpoint(step: int, marker: Path) -> dict[str, str]:
    """As :func:`kill_after_checkpoint`, but only the first process to write that checkpoint dies: it creates
    ``marker`` first, and a process that finds it trains on. A crash that a retry does not meet again."""
    return {**kill_after_checkpoint(step), "OPSD_TEST_KILL_ONCE_MARKER": str(marker)}


def kill_dvc_after_writes(under: Path, count: int) -> dict[str, str]:
    """Environment for a process whose ``dvc`` children SIGKILL themselves right after the ``count``-th file
    they move into place under ``under`` (the DVC cache or a local remote): DVC writes each object to a
    temporary name and renames it, so this is a crash between two objects of one ``dvc add`` / ``dvc push``,
    with what a real crash leaves (the objects before it, temporary files of the transfers in flight)."""
    path = os.pathsep.join(p for p in (FAULTS, os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "OPSD_TEST_KILL_DVC_UNDER": str(Path(under).resolve()),
            "OPSD_TEST_KILL_DVC_AFTER": str(count)}
