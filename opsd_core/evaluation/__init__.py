"""Evaluation: lm-eval tasks over our data, base-vs-candidate runs, paired bootstrap.

Import the submodules directly where lm-eval is not needed (``bootstrap``, ``tasks``, ``metrics``);
``harness`` and ``report`` import torch and run lm-eval.
"""

from __future__ import annotations

from opsd_core.evaluation.bootstrap import paired_bootstrap
from opsd_core.evaluation.errors import EvalDataError, EvalError, EvalTaskError
from opsd_core.evaluation.tasks import OWN_TASKS, write_task_yamls

__all__ = [
    "OWN_TASKS",
    "EvalDataError",
    "EvalError",
    "EvalTaskError",
    "paired_bootstrap",
    "write_task_yamls",
]
