"""The self-teacher gap: its reading, a planted gap on the tiny model, no effect on the training that
follows, and `opsd diagnose` / `opsd train` recording it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opsd_core.algorithm.diagnose import Gap, measure, pick, reading, render
from opsd_core.algorithm.trainer import OPSDTrainer, Problem, load_problems, solution_ids
from opsd_core.config import Params, load_params
from opsd_core.data.arithmetic import ArithmeticDifficulty, arithmetic_rows
from opsd_core.models.sources import load_model_and_tokenizer
from opsd_core.stages.train import build_trainer

ROOT = Path(__file__).resolve().parents[1]


def _gap(student: float, teacher: float, ll: float = 0.0, flex: tuple[float, float] | None = None) -> Gap:
    sf, tf = flex or (student, teacher)
    return Gap(problems=20, student_greedy=student, teacher_greedy=teacher, student_greedy_flex=sf,
               teacher_greedy_flex=tf, student_sampled=student, teacher_sampled=teacher, divergence=0.1,
               answer_ll_gap=ll)


@pytest.mark.parametrize(("gap", "words"), [
    (_gap(0.10, 0.65), "the teacher is 55 points better than the student: room for OPSD"),
    (_gap(0.0, 0.05, flex=(0.05, 0.40)), "35 points better"),  # the flexible extraction's gap counts
    (_gap(0.60, 0.30), "30 points worse"),
    (_gap(0.0, 0.05), "no gap: even with the solution in its context the model solves almost nothing"),
    (_gap(0.95, 1.0), "no gap: the student already solves 95%"),
    (_gap(0.40, 0.45, ll=1.2), "the teacher is much surer of the reference answer (+1.20 nats/token)"),
    (_gap(0.40, 0.45, ll=0.1), "no gap (+5 points): OPSD has little to distil"),
])
def test_the_reading_says_what_the_gap_means(gap: Gap, words: str) -> None:
    assert words in reading(gap)
    assert reading(gap) in render(gap) and gap.to_dict()["reading"] == reading(gap)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Params:
    cache = tmp_path_factory.mktemp("models")
    return load_params(ROOT / "params.yaml", "smoke", [
        f"model.cache_dir={cache}", "lora.enabled=false", "opsd.sampling.max_new_tokens=16"])


@pytest.fixture(scope="module")
def train_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(r.to_json_line() for r in arithmetic_rows(4, 0, ArithmeticDifficulty(1, 9))))
    return path


def _trainer(params: Params, model: torch.nn.Module, tok: object, problems: list[Problem], run: Path) -> OPSDTrainer:
    return build_trainer(params, model, tok, problems, torch.device("cpu"), run, log=lambda _m: None)


def test_a_planted_gap_is_measured(tiny: Params, train_file: Path, tmp_path: Path) -> None:
    """SFT the tiny model to answer right behind the teacher's context and '#### 0' behind the student's:
    the diagnosis must find the teacher right, the student wrong, and say there is room for OPSD."""
    model, tok = load_model_and_tokenizer(tiny.model, ROOT)
    model.requires_grad_(True)
    problems = load_problems(train_file, tok)
    before = measure(_trainer(tiny, model, tok, problems, tmp_path / "a"), problems)
    wrong = solution_ids(tok, "#### 0")
    plant = [Problem(p.id + "t", p.teacher_ids, p.teacher_ids, p.solution_ids, p.answer) for p in problems] + \
            [Problem(p.id + "s", p.student_ids, p.student_ids, wrong, "0") for p in problems]
    sft = tiny.model_copy(deep=True)
    sft.train = sft.train.model_copy(update={"objective": "sft", "rollouts_per_step": 8, "micro_batch_size": 8,
                                             "lr": 5e-3, "warmup_steps": 0, "schedule": "constant"})
    planter = _trainer(sft, model, tok, plant, tmp_path / "b")
    # 100 steps at 5e-3 converge (SFT loss < 0.01) on AVX2 and AVX-512 kernels alike; 60 at 1e-2 bounced
    # around 0.2 on AVX-512, where the plant then held for 1 of 4 problems
    for step in range(100):
        planter.step(step)
    after = measure(_trainer(tiny, model, tok, problems, tmp_path / "c"), problems)
    assert before.teacher_greedy_flex == 0.0 and before.accuracy_gap == 0.0  # the random model solves nothing
    assert "no gap" in reading(before)
    assert after.student_greedy == 0.0 and after.teacher_greedy >= 0.75
    assert after.accuracy_gap >= 0.75 and "room for OPSD" in reading(after)
    assert after.answer_ll_gap > 1.0 > before.answer_ll_gap  # the teacher is surer of the right answer line
    assert after.divergence > 0


def test_the_diagnosis_does_not_change_the_training(tiny: Params, train_file: Path, tmp_path: Path) -> None:
    """A training that starts after the diagnosis takes exactly the steps it takes without one."""
    params = tiny.model_copy(deep=True)
    params.lora.enabled = True
    weights = []
    for run, diagnose in (("plain", False), ("diagnosed", True)):
        model, tok = load_model_and_tokenizer(params.model, ROOT)
        torch.manual_seed(0)
        from opsd_core.models.lora import wrap_lora

        model = wrap_lora(model, params.lora)
        problems = load_problems(train_file, tok)
        trainer = _trainer(params, model, tok, problems, tmp_path / run)
        if diagnose:
            state = torch.get_rng_state()
            measure(trainer, pick(problems, 3, 0))
            assert torch.equal(torch.get_rng_state(), state)
        for step in range(2):
            trainer.step(step)
            torch.rand(1)  # the global RNG is used between steps (dropout, inits): it must be where it was
        weights.append({n: p.detach().clone() for n, p in trainer.trainable.items()})
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])


def test_pick_is_seeded_and_bounded(tiny: Params, train_file: Path) -> None:
    _, tok = load_model_and_tokenizer(tiny.model, ROOT)
    problems = load_problems(train_file, tok)
    assert [p.id for p in pick(problems, 3, 0)] == [p.id for p in pick(problems, 3, 0)]
    assert len(pick(problems, 99, 0)) == len(problems)
    assert {p.id for p in pick(problems, 99, 1)} == {p.id for p in problems}


@pytest.mark.slow
def test_opsd_diagnose_and_train_record_the_gap(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    text = (ROOT / "params.yaml").read_text().replace("profile: default", "profile: smoke", 1)
    (project / "params.yaml").write_text(text.replace("cache_dir: .opsd/models", f"cache_dir: {tmp_path / 'm'}", 1))

    def opsd(*args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=project, env=dict(os.environ),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    opsd("data", "generate")
    opsd("prepare")
    shown = opsd("diagnose")
    record = json.loads((project / "reports/diagnosis.json").read_text())
    assert record["problems"] == 16 and record["reading"] in shown.stderr
    assert "self-teacher gap on 16 training problems" in shown.stderr
    trained = opsd("train")
    summary = json.loads((project / "reports/train.json").read_text())
    # the same starting model, the same problems and seeds: the same figures as `opsd diagnose`
    assert summary["diagnosis"] == record and record["reading"] in trained.stderr
    metrics = json.loads((project / "reports/metrics/train.json").read_text())
    assert metrics["teacher_gap"] == record["accuracy_gap"]
