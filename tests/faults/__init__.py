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
