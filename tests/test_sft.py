"""train.objective sft and mix: the SFT loss against a full-logits reference, the step's token mean over
micro-batches, the mix's weighting, and SFT learning the verified solutions on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from opsd_core.algorithm.losses import token_nll_sum
from opsd_core.algorithm.scoring import build_scoring_batch, completion_hidden, lm_head, right_pad
from opsd_core.algorithm.trainer import OPSDTrainer, Problem, load_problems
from opsd_core.config import ConfigError, Params, load_params
from opsd_core.data.arithmetic import ArithmeticDifficulty, arithmetic_rows
from opsd_core.models.lora import wrap_lora
from opsd_core.models.sources import load_model_and_tokenizer
from opsd_core.stages.train import build_trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Params:
    cache = tmp_path_factory.mktemp("models")
    return load_params(ROOT / "params.yaml", "smoke", [f"model.cache_dir={cache}"])


@pytest.fixture(scope="module")
def train_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = arithmetic_rows(6, 0, ArithmeticDifficulty(steps=1, max_number=20))
    path.write_text("".join(r.to_json_line() for r in rows))
    return path


def _trainer(params: Params, train_file: Path, tmp: Path, lora: bool = True, **train: object
             ) -> tuple[OPSDTrainer, list[Problem]]:
    params = params.model_copy(deep=True)
    params.lora.enabled = lora
    for key, value in train.items():
        setattr(params.train, key, value)
    model, tok = load_model_and_tokenizer(params.model, ROOT)
    torch.manual_seed(0)
    model = wrap_lora(model, params.lora) if lora else model.requires_grad_(True)
    problems = load_problems(train_file, tok)
    return build_trainer(params, model, tok, problems, torch.device("cpu"), tmp / "run", log=lambda _m: None), problems


def _grads(trainer: OPSDTrainer) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in trainer.trainable.items() if p.grad is not None}


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_token_nll_sum_equals_the_full_logits_cross_entropy(chunk: int) -> None:
    gen = torch.Generator().manual_seed(chunk)
    hidden = torch.randn(3, 5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (3, 5), generator=gen)
    mask = torch.rand(3, 5, generator=gen) > 0.3
    got = token_nll_sum(hidden, weight, targets, mask, chunk_size=chunk)
    g_hidden, g_weight = torch.autograd.grad(got, [hidden, weight])
    logits = hidden @ weight.T
    expected = F.cross_entropy(logits[mask], targets[mask], reduction="sum")
    e_hidden, e_weight = torch.autograd.grad(expected, [hidden, weight])
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(g_hidden, e_hidden)
    torch.testing.assert_close(g_weight, e_weight)
    assert float(got.detach()) > 0


def test_solution_ids_end_with_eos(tiny: Params, train_file: Path) -> None:
    _, tok = load_model_and_tokenizer(tiny.model, ROOT)
    problems = load_problems(train_file, tok)
    first = train_file.read_text().splitlines()[0]
    assert all(p.solution_ids[-1] == tok.eos_token_id for p in problems)
    assert problems[0].answer and problems[0].answer in first
    assert tok.decode(problems[0].solution_ids[:-1]).strip().endswith(f"#### {problems[0].answer}")


def test_the_sft_gradient_is_the_step_token_mean_over_micro_batches(tiny: Params, train_file: Path,
                                                                   tmp_path: Path) -> None:
    """Micro-batches of 2 give the gradient of one full-batch token mean of the solutions' NLL."""
    trainer, problems = _trainer(tiny, train_file, tmp_path, objective="sft", rollouts_per_step=4,
                                 micro_batch_size=2)
    batch = problems[:4]
    loss, tokens = trainer.accumulate_sft(batch)
    got = _grads(trainer)
    trainer.optimizer.zero_grad(set_to_none=True)
    ids, mask = right_pad([p.solution_ids for p in batch], trainer.pad_id)
    sb = build_scoring_batch([p.student_ids for p in batch], ids, mask, trainer.pad_id)
    logits = lm_head(trainer.model)(completion_hidden(trainer.model, sb)).float()
    reference = F.cross_entropy(logits[mask], ids[mask], reduction="sum") / int(mask.sum())
    reference.backward()
    expected = _grads(trainer)
    assert tokens == sum(len(p.solution_ids) for p in batch)
    assert loss == pytest.approx(float(reference), rel=1e-5)
    assert set(got) == set(expected) and got
    for name in got:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-4)


def test_sft_learns_the_solutions_without_sampling(tiny: Params, train_file: Path, tmp_path: Path) -> None:
    # full fine-tuning: LoRA on the random tiny model's frozen head cannot fit text (measured: 6.3 -> 5.8 nats)
    trainer, problems = _trainer(tiny, train_file, tmp_path, lora=False, objective="sft", rollouts_per_step=6,
                                 micro_batch_size=3, lr=3e-3, steps=12, warmup_steps=0, schedule="constant")

    def nll() -> float:
        ids, mask = right_pad([p.solution_ids for p in problems], trainer.pad_id)
        sb = build_scoring_batch([p.student_ids for p in problems], ids, mask, trainer.pad_id)
        trainer.model.eval()
        with torch.no_grad():
            hidden = completion_hidden(trainer.model, sb)
            return float(token_nll_sum(hidden, lm_head(trainer.model).weight, ids, mask)) / int(mask.sum())

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("the SFT objective sampled rollouts")

    trainer.rollout = refuse  # type: ignore[method-assign]
    before = nll()
    rows = [trainer.step(s) for s in range(12)]
    after = nll()
    assert after < 0.6 * before, (before, after)
    assert all("sample_tok_s" not in r and "kl" not in r for r in rows)
    assert rows[-1]["sft_loss"] == rows[-1]["loss"] and rows[-1]["completion_len"] > 3


def test_mix_weights_the_two_gradients(tiny: Params, train_file: Path, tmp_path: Path) -> None:
    """mix's gradient is (1 - w) * OPSD's + w * SFT's on the same rollouts; its loss the same blend."""
    w = 0.3
    trainer, problems = _trainer(tiny, train_file, tmp_path, objective="mix", mix_weight=w,
                                 rollouts_per_step=2, micro_batch_size=2)
    batch = problems[:2]
    rollouts = trainer.rollout(batch, 0)
    opsd = trainer.accumulate(batch, rollouts)
    g_opsd = _grads(trainer)
    trainer.optimizer.zero_grad(set_to_none=True)
    sft, _ = trainer.accumulate_sft(batch)
    g_sft = _grads(trainer)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.accumulate(batch, rollouts, scale=1 - w)
    trainer.accumulate_sft(batch, scale=w)
    g_mix = _grads(trainer)
    trainer.optimizer.zero_grad(set_to_none=True)
    assert opsd["kl"] > 0 and sft > 0
    for name in g_mix:
        torch.testing.assert_close(g_mix[name], (1 - w) * g_opsd[name] + w * g_sft[name], atol=1e-7, rtol=1e-4)
    row = trainer.step(0)
    assert {"loss", "kl", "sft_loss", "sample_tok_s"} <= set(row)
    # opsd.clip is none here: the OPSD term's loss is its KL
    assert row["loss"] == pytest.approx((1 - w) * row["kl"] + w * row["sft_loss"], rel=1e-5)


def test_objective_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="train.objective"):
        load_params(None, None, ["train.objective=rl"])
    with pytest.raises(ConfigError, match="train.mix_weight"):
        load_params(None, None, ["train.mix_weight=1.5"])
