"""opsd.contrast: the contrastive target's math, the chunked loss against the full-logits reference, and
the trainer's extra teacher pass on the tiny model."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from opsd_core.algorithm.losses import (
    DivergenceSpec,
    chunked_divergence_loss,
    contrastive_teacher_logits,
    masked_mean,
    token_divergence,
)
from opsd_core.algorithm.trainer import load_problems
from opsd_core.config import ConfigError, load_params
from opsd_core.data.arithmetic import ArithmeticDifficulty, arithmetic_rows
from opsd_core.models.lora import wrap_lora
from opsd_core.models.sources import load_model_and_tokenizer
from opsd_core.stages.train import build_trainer

ROOT = Path(__file__).resolve().parents[1]


def _logits(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_a_wrong_teacher_equal_to_the_student_leaves_the_plain_teacher(temperature: float) -> None:
    s, t = _logits(5, 9, seed=1), _logits(5, 9, seed=2)
    target = contrastive_teacher_logits(s, t, s.clone(), 1.0, temperature)
    torch.testing.assert_close(torch.log_softmax(target / temperature, -1), torch.log_softmax(t / temperature, -1))


def test_what_both_teachers_share_teaches_nothing() -> None:
    """Teachers that agree (the context's style alone) give the student back: zero divergence, zero gradient."""
    s = _logits(4, 7, seed=3).requires_grad_(True)
    t = _logits(4, 7, seed=4)
    spec = DivergenceSpec(temperature=1.1)
    out = token_divergence(s, contrastive_teacher_logits(s, t, t.clone(), 1.0, spec.temperature), spec)
    (grad,) = torch.autograd.grad(out.loss.sum(), [s])
    assert float(out.kl.abs().max()) < 1e-12 and float(grad.abs().max()) < 1e-12
    # weight 0: the student whatever the teachers say
    zero = contrastive_teacher_logits(s, t, _logits(4, 7, seed=5), 0.0, 1.0)
    torch.testing.assert_close(torch.log_softmax(zero, -1), torch.log_softmax(s.detach(), -1))


def test_the_target_follows_what_depends_on_the_right_solution() -> None:
    """A token only the right solution raises gains; one both raise does not."""
    s = torch.zeros(1, 4, dtype=torch.float64)
    t = torch.tensor([[3.0, 3.0, 0.0, 0.0]], dtype=torch.float64)   # raises 0 and 1
    w = torch.tensor([[0.0, 3.0, 0.0, 0.0]], dtype=torch.float64)   # raises 1 only: style
    q = torch.softmax(contrastive_teacher_logits(s, t, w, 1.0, 1.0), -1)[0]
    assert q[0] > 0.5 and q[1] == pytest.approx(q[2]) == pytest.approx(q[3])


@pytest.mark.parametrize("chunk", [1, 3, 50])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_the_chunked_contrastive_loss_equals_the_full_logits_reference(chunk: int, divergence: str) -> None:
    gen = torch.Generator().manual_seed(chunk)
    b, t_len, h, v = 2, 5, 6, 11
    hs = torch.randn(b, t_len, h, generator=gen, dtype=torch.float64, requires_grad=True)
    ht, hw = (torch.randn(b, t_len, h, generator=gen, dtype=torch.float64) for _ in range(2))
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(b, t_len, generator=gen) > 0.25
    spec = DivergenceSpec(divergence=divergence, temperature=0.9)
    got, metrics = chunked_divergence_loss(hs, ht, weight, mask, spec, chunk_size=chunk, contrast_hidden=hw,
                                           contrast_weight=0.7)
    g_got = torch.autograd.grad(got, [hs, weight])
    s_logits = hs @ weight.T
    target = contrastive_teacher_logits(s_logits, ht @ weight.T, hw @ weight.T, 0.7, spec.temperature)
    ref = masked_mean(token_divergence(s_logits, target, spec).loss, mask)
    g_ref = torch.autograd.grad(ref, [hs, weight])
    torch.testing.assert_close(got, ref)
    for a, e in zip(g_got, g_ref, strict=True):
        torch.testing.assert_close(a, e)
    plain, _ = chunked_divergence_loss(hs, ht, weight, mask, spec, chunk_size=chunk)
    assert abs(float(plain.detach()) - float(got.detach())) > 1e-3  # the contrast changed the target


def test_the_trainer_contrasts_with_another_problems_solution(tmp_path: Path) -> None:
    params = load_params(ROOT / "params.yaml", "smoke", [f"model.cache_dir={tmp_path / 'm'}", "opsd.contrast=shuffled",
                                                          "train.rollouts_per_step=2", "train.micro_batch_size=2"])
    data = tmp_path / "train.jsonl"
    data.write_text("".join(r.to_json_line() for r in arithmetic_rows(4, 0, ArithmeticDifficulty(1, 9))))
    model, tok = load_model_and_tokenizer(params.model, ROOT)
    torch.manual_seed(0)
    model = wrap_lora(model, params.lora)
    problems = load_problems(data, tok, contrast=True)
    plain = load_problems(data, tok)
    assert all(p.wrong_ids and p.wrong_ids != p.teacher_ids for p in problems)
    assert not any(p.wrong_ids for p in plain)
    # the wrong context is the teacher's context of the same problem with its shuffled partner's solution
    partners = load_problems(data, tok, context="shuffled")
    assert [p.wrong_ids for p in problems] == [p.teacher_ids for p in partners]
    trainer = build_trainer(params, model, tok, problems, torch.device("cpu"), tmp_path / "run", log=lambda _m: None)
    rollouts = trainer.rollout(problems[:2], 0)
    row = trainer.accumulate(problems[:2], rollouts)
    trainer.optimizer.zero_grad(set_to_none=True)
    assert row["kl"] > 0 and row["loss"] > 0
    # contrasted with its own context, the teacher teaches nothing: the contrast is what the loss reads
    same = [replace(p, wrong_ids=p.teacher_ids) for p in problems[:2]]
    row = trainer.accumulate(same, rollouts)
    grads = [p.grad for p in trainer.trainable.values() if p.grad is not None]
    assert row["kl"] < 1e-6 and max(float(g.abs().max()) for g in grads) < 1e-6
    trainer.optimizer.zero_grad(set_to_none=True)
    with pytest.raises(Exception, match="wrong-solution contexts"):
        trainer.accumulate(plain[:2], rollouts)


def test_contrast_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="opsd.contrast"):
        load_params(None, None, ["opsd.contrast=always"])
    with pytest.raises(ConfigError, match="opsd.contrast_weight"):
        load_params(None, None, ["opsd.contrast_weight=0"])


def _format_position() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The answer-line position: token 0 is ``####``; both teachers are sure of it, the wrong one a little surer,
    so it rules out the rare alternatives harder than the right one does."""
    p_s = torch.tensor([[0.85, 0.05, 0.05, 0.05]], dtype=torch.float64)
    p_t = torch.tensor([[0.97, 0.01, 0.01, 0.01]], dtype=torch.float64)
    p_w = torch.tensor([[0.99997, 1e-5, 1e-5, 1e-5]], dtype=torch.float64)
    return p_s.log(), p_t.log(), p_w.log()


def test_without_a_plausibility_limit_the_tails_take_over_a_shared_format_token() -> None:
    s, t, w = _format_position()
    q = torch.softmax(contrastive_teacher_logits(s, t, w, 1.0, 1.0, plausibility=0.0), -1)[0]
    assert int(q.argmax()) != 0  # the failure the study saw: the target gives up ####


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.5])
def test_the_plausibility_limit_keeps_a_shared_format_token(alpha: float) -> None:
    s, t, w = _format_position()
    q = torch.softmax(contrastive_teacher_logits(s, t, w, 1.0, 1.0, plausibility=alpha), -1)[0]
    assert int(q.argmax()) == 0 and float(q[0]) > 0.8  # about the student's own 0.85


def test_implausible_tokens_are_never_raised_and_plausible_ones_keep_the_ratio() -> None:
    s, t, w = _logits(6, 11, seed=7), _logits(6, 11, seed=8), _logits(6, 11, seed=9)
    alpha = 0.2
    limited = contrastive_teacher_logits(s, t, w, 0.8, 1.0, plausibility=alpha)
    plain = contrastive_teacher_logits(s, t, w, 0.8, 1.0)
    ls, lt, lw = (torch.log_softmax(x, -1) for x in (s, t, w))
    raw_limited = ls + 0.8 * torch.where(lt < lt.amax(-1, keepdim=True) + math.log(alpha), (lt - lw).clamp(max=0),
                                         lt - lw)
    torch.testing.assert_close(limited, torch.log_softmax(raw_limited, -1))
    implausible = lt < lt.amax(-1, keepdim=True) + math.log(alpha)
    # unnormalised: an implausible token's score never exceeds the student's own log-probability
    assert bool((raw_limited[implausible] <= ls[implausible] + 1e-12).all())
    assert bool(implausible.any()) and not torch.allclose(limited, plain)
    torch.testing.assert_close(contrastive_teacher_logits(s, t, w, 0.8, 1.0, plausibility=0.0), plain)


def test_the_plausibility_setting_is_checked() -> None:
    assert load_params(None, None, []).opsd.contrast_plausibility == 0.1
    for bad in ("-0.1", "1"):
        with pytest.raises(ConfigError, match="opsd.contrast_plausibility"):
            load_params(None, None, [f"opsd.contrast_plausibility={bad}"])
