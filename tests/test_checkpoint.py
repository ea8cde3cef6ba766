"""Checkpoints load without running code, refuse files that are not ours, and a damaged newest one is
skipped for the one before it."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from opsd_core import checkpoint as ckpt
from opsd_core.config import Params
from opsd_core.stages.train import build_trainer
from tests.support import fixed_rollouts, load_policy, toy_problems, train_steps


class _Payload:
    """What a hostile checkpoint carries: unpickling it would create a file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (self.marker,))


def _write(path: Path, obj: object) -> ckpt.Checkpoint:
    path.mkdir(parents=True)
    torch.save(obj, path / "state.pt")
    return ckpt.Checkpoint(int(path.name.removeprefix(ckpt.PREFIX)), path)


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    found = _write(tmp_path / "run" / "step-0000002", {"format": ckpt.FORMAT, "x": _Payload(str(marker))})
    with pytest.raises(ckpt.CheckpointError, match="not a loadable opsd checkpoint"):
        ckpt.load(found)
    assert not marker.exists()
    # the same object through a full unpickle would have run (the test's payload is real)
    torch.load(found.path / "state.pt", weights_only=False)
    assert marker.exists()


def test_foreign_and_truncated_files_are_clear_errors(tmp_path: Path) -> None:
    foreign = _write(tmp_path / "a" / "step-0000001", {"weights": torch.zeros(2)})
    with pytest.raises(ckpt.CheckpointError, match=f"not an opsd checkpoint .*{ckpt.FORMAT}"):
        ckpt.load(foreign)
    cut = _write(tmp_path / "b" / "step-0000001", {"format": ckpt.FORMAT, "w": torch.zeros(1000)})
    data = (cut.path / "state.pt").read_bytes()
    (cut.path / "state.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match=str(cut.path / "state.pt")):
        ckpt.load(cut)


def test_rng_state_round_trips_through_plain_types() -> None:
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    state = ckpt.rng_state()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(0)
    np.random.seed(0)
    ckpt.set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    assert isinstance(state["numpy"][1], list)


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(smoke: Params, tmp_path: Path) -> None:
    params = smoke.model_copy(deep=True)
    params.train.keep_checkpoints = 3
    model, tok = load_policy(params)
    logs: list[str] = []
    trainer = build_trainer(params, model, tok, toy_problems(tok), torch.device("cpu"), tmp_path / "run", log=logs.append)
    rollouts = fixed_rollouts(tok, 4)
    for step in (1, 2):
        train_steps(trainer, rollouts, 1)
        trainer.state.step = step
        trainer.save_checkpoint()
    newest = ckpt.latest(tmp_path / "run")
    assert newest is not None and newest.step == 2
    (newest.path / "state.pt").write_bytes(b"\x00" * 64)  # a torn write

    model2, _ = load_policy(params)
    resumed = build_trainer(params, model2, tok, toy_problems(tok), torch.device("cpu"), tmp_path / "run", log=logs.append)
    assert resumed.resume() and resumed.state.step == 1
    assert any("skipping checkpoint" in m and "step-0000002" in m for m in logs), logs
    assert any("resumed from" in m and "step-0000001" in m for m in logs), logs


def test_only_the_newest_checkpoints_are_kept_and_resume_takes_the_newest(smoke: Params, tmp_path: Path) -> None:
    params = smoke.model_copy(deep=True)
    params.train.keep_checkpoints = 2
    model, tok = load_policy(params)
    run = tmp_path / "run"
    trainer = build_trainer(params, model, tok, toy_problems(tok), torch.device("cpu"), run, log=lambda _m: None)
    rollouts = fixed_rollouts(tok, 4)
    for step in range(1, 6):
        train_steps(trainer, rollouts, 1)  # different weights at every checkpoint
        trainer.state.step = step
        trainer.save_checkpoint()
        kept = [c.step for c in ckpt.complete(run)]
        assert kept == list(range(step, max(0, step - 2), -1)), (step, kept)
    assert sorted(p.name for p in run.iterdir()) == ["step-0000004", "step-0000005"]  # no temporary folders
    weights = {n: p.detach().clone() for n, p in trainer.trainable.items()}

    logs: list[str] = []
    model2, _ = load_policy(params)
    resumed = build_trainer(params, model2, tok, toy_problems(tok), torch.device("cpu"), run, log=logs.append)
    assert resumed.resume() and resumed.state.step == 5
    assert logs == [f"resumed from {run / 'step-0000005'} (step 5/{params.train.steps})"]
    for name, p in resumed.trainable.items():
        assert torch.equal(p, weights[name]), name
