"""``opsd diagnose``: the self-teacher gap (:mod:`opsd_core.algorithm.diagnose`) of the model ``opsd train``
would start from, on ``opsd.diagnose_problems`` training problems, without training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from opsd_core.algorithm.diagnose import record_gap
from opsd_core.algorithm.trainer import TrainingError
from opsd_core.backends.runtime import configure_threads
from opsd_core.config import Params
from opsd_core.io import write_json
from opsd_core.layout import Layout
from opsd_core.stages.train import build_policy, build_trainer, execution_plan, training_problems


def diagnose(params: Params, root: Path) -> dict[str, Any]:
    """``opsd diagnose``: the gap of the model ``opsd train`` would start from, written to
    ``reports/diagnosis.json``."""
    if params.opsd.diagnose_problems == 0:
        params = params.model_copy(deep=True)
        params.opsd.diagnose_problems = 16
    layout = Layout.of(params, root)
    train_file = layout.train_split
    if not train_file.is_file():
        raise TrainingError(f"{train_file} does not exist: run `opsd prepare` first")
    configure_threads(params.train.threads)
    plan = execution_plan(params, world_size=1)
    model, tokenizer, _ = build_policy(params, root, plan)
    problems = training_problems(params, train_file, tokenizer)
    trainer = build_trainer(params, model, tokenizer, problems, torch.device(plan.device), root / params.train.checkpoint_dir / "diagnose",
                            plan=plan)  # the run folder is never written: no step is taken
    record = record_gap(trainer, None)
    assert record is not None
    write_json(layout.diagnosis_report, record)
    return record
