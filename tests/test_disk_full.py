"""A full disk while training writes its state: a clear error, nothing lost, and the next run recovers.

The fault is injected at the library call that writes (``torch.save``, ``save_pretrained``) as the
ENOSPC error the operating system raises; opsd's own code runs unchanged.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

from opsd_core import checkpoint as ckpt
from opsd_core.algorithm.trainer import TrainingError
from opsd_core.config import Params
from opsd_core.models.sources import resolve_base_dir
from opsd_core.stages.train import build_trainer, save_candidate
from tests.support import ROOT, load_policy, toy_problems

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_at_a_checkpoint_keeps_the_older_ones_and_the_rerun_resumes(
        smoke: Params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    params = smoke.model_copy(deep=True)
    params.train.steps, params.train.checkpoint_every, params.train.progress = 4, 1, False
    run_dir = tmp_path / "run"
    model, tok = load_policy(params)
    trainer = build_trainer(params, model, tok, toy_problems(tok), torch.device("cpu"), run_dir, log=lambda _m: None)
    real_save, calls = torch.save, []

    def save_until_full(obj: object, f: object, *args: object, **kwargs: object) -> None:
        calls.append(f)
        if len(calls) == 3:  # the step-3 checkpoint: the disk is full
            raise ENOSPC
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    with pytest.raises(ckpt.CheckpointError, match=r"step-3 checkpoint .*No space left on device; free space and "
                                                   r"rerun `opsd train`: it resumes from step 2$"):
        trainer.run()
    assert [c.step for c in ckpt.complete(run_dir)] == [2, 1][: params.train.keep_checkpoints]
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".tmp-")]  # no half-written state
    monkeypatch.setattr(torch, "save", real_save)  # space freed

    model2, _ = load_policy(params)
    logs: list[str] = []
    again = build_trainer(params, model2, tok, toy_problems(tok), torch.device("cpu"), run_dir, log=logs.append)
    state = again.run()
    assert state.step == 4 and any("resumed from" in line and "step 2/4" in line for line in logs)


def test_a_full_disk_writing_the_candidate_keeps_the_previous_one(
        smoke: Params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    model, tok = load_policy(smoke)
    base_path = resolve_base_dir(smoke.model, ROOT)
    first = save_candidate(smoke, tmp_path, model, tok, base_path, "a" * 16, torch.device("cpu"))
    candidate = tmp_path / smoke.train.output_dir
    before = {p.name: p.read_bytes() for p in candidate.iterdir()}

    def full(*args: object, **kwargs: object) -> None:
        raise ENOSPC

    monkeypatch.setattr(type(model), "save_pretrained", full)
    with pytest.raises(TrainingError, match=r"^cannot write the candidate to .*: No space left on device; free "
                                            r"space and rerun `opsd train`"):
        save_candidate(smoke, tmp_path, model, tok, base_path, "b" * 16, torch.device("cpu"))
    assert {p.name: p.read_bytes() for p in candidate.iterdir()} == before  # the previous candidate, intact
    assert first["data_hash"] == "a" * 16
    assert sorted(p.name for p in candidate.parent.iterdir()) == [candidate.name]  # no temporary folder left
