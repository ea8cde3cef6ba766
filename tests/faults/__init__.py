"""Fault injection for the crash-and-resume tests: no hook in opsd, a start-up file in the test process."""

from __future__ import annotations

import os

FAULTS = os.path.dirname(os.path.abspath(__file__))


def kill_after_checkpoint(step: int) -> dict[str, str]:
    """Environment for an opsd subprocess that SIGKILLs itself right after the step-``step`` checkpoint
    (``sitecustomize.py`` beside this file; every process of a torchrun launch inherits it)."""
    path = os.pathsep.join(p for p in (FAULTS, os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "OPSD_TEST_KILL_AFTER_CHECKPOINT": str(step)}
