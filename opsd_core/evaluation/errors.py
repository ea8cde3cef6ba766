"""Errors of the evaluation stage (each message names the task or file at fault)."""

from __future__ import annotations

from opsd_core.errors import OpsdError


class EvalError(OpsdError, RuntimeError):
    """An evaluation that cannot run as configured."""


class EvalTaskError(EvalError, ValueError):
    """A task name that is neither an own task nor a known lm-eval task."""


class EvalDataError(EvalError):
    """A task whose data is missing, empty, malformed or not available offline."""
