"""Tests for opsd_core.algorithm.losses: divergences, supports, clipping, reductions and the chunked path."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from opsd_core.algorithm.losses import (
    DivergenceSpec,
    chunked_divergence_loss,
    divergence_loss,
    masked_mean,
    token_divergence,
)
from opsd_core.config import OPSDConfig

D64 = torch.float64
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.3)]


def _logits(*shape: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=D64) * scale


def _kl(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """Direct KL(p || q) from log-probabilities, summed over the last dim."""
    return (p_logp.exp() * (p_logp - q_logp)).sum(-1)


# ---------------------------------------------------------------- identity and direct formulas


@pytest.mark.parametrize("support", ["full", "topk", "sampled"])
@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES)
def test_identical_distributions_give_zero_loss_and_gradient(
    support: str, divergence: str, beta: float
) -> None:
    logits = _logits(6, 17)
    student = logits.clone().requires_grad_(True)
    spec = DivergenceSpec(divergence=divergence, beta=beta, support=support, topk=5)  # type: ignore[arg-type]
    ids = torch.randint(0, 17, (6,), generator=torch.Generator().manual_seed(1))
    out = token_divergence(student, logits, spec, sampled_ids=ids)
    out.loss.sum().backward()
    assert out.loss.shape == (6,)
    torch.testing.assert_close(out.loss, torch.zeros(6, dtype=D64), atol=1e-12, rtol=0)
    torch.testing.assert_close(out.kl, torch.zeros(6, dtype=D64), atol=1e-12, rtol=0)
    torch.testing.assert_close(student.grad, torch.zeros_like(logits), atol=1e-12, rtol=0)


def test_forward_and_reverse_kl_match_direct_formulas() -> None:
    s, t = _logits(4, 3, 13, seed=1), _logits(4, 3, 13, seed=2)
    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    fwd = token_divergence(s, t, DivergenceSpec(divergence="forward_kl"))
    rev = token_divergence(s, t, DivergenceSpec(divergence="reverse_kl"))
    assert fwd.loss.shape == (4, 3) and fwd.loss.dtype == D64
    torch.testing.assert_close(fwd.loss, _kl(lt, ls))
    torch.testing.assert_close(rev.loss, _kl(ls, lt))
    torch.testing.assert_close(fwd.kl, fwd.loss)
    assert not torch.allclose(fwd.loss, rev.loss)  # the two directions genuinely differ here


def test_jsd_endpoints_are_exactly_forward_and_reverse() -> None:
    s, t = _logits(5, 19, seed=3), _logits(5, 19, seed=4)
    for clip in ("none", "pointwise", "token"):
        fwd = token_divergence(s, t, DivergenceSpec(divergence="forward_kl", clip=clip))  # type: ignore[arg-type]
        rev = token_divergence(s, t, DivergenceSpec(divergence="reverse_kl", clip=clip))  # type: ignore[arg-type]
        j0 = token_divergence(s, t, DivergenceSpec(divergence="jsd", beta=0.0, clip=clip))  # type: ignore[arg-type]
        j1 = token_divergence(s, t, DivergenceSpec(divergence="jsd", beta=1.0, clip=clip))  # type: ignore[arg-type]
        assert torch.equal(j0.loss, fwd.loss) and torch.equal(j0.clipped, fwd.clipped)
        assert torch.equal(j1.loss, rev.loss) and torch.equal(j1.clipped, rev.clipped)


def test_jsd_half_is_symmetric_and_bounded_by_log2() -> None:
    s, t = _logits(64, 11, seed=5, scale=6.0), _logits(64, 11, seed=6, scale=6.0)
    spec = DivergenceSpec(divergence="jsd", beta=0.5)
    a, b = token_divergence(s, t, spec).loss, token_divergence(t, s, spec).loss
    torch.testing.assert_close(a, b)
    assert (a >= -1e-12).all() and (a <= math.log(2) + 1e-12).all()
    assert a.max() > 0.5 * math.log(2)  # the scale makes some pairs nearly disjoint: the bound is tested


def test_jsd_matches_direct_mixture_formula() -> None:
    beta = 0.3
    s, t = _logits(7, 23, seed=7), _logits(7, 23, seed=8)
    p_s, p_t = torch.softmax(s, -1), torch.softmax(t, -1)
    m = beta * p_t + (1 - beta) * p_s
    expected = beta * (p_t * (p_t / m).log()).sum(-1) + (1 - beta) * (p_s * (p_s / m).log()).sum(-1)
    out = token_divergence(s, t, DivergenceSpec(divergence="jsd", beta=beta))
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES)
def test_temperature_equals_dividing_logits_by_hand(divergence: str, beta: float) -> None:
    s, t = _logits(5, 29, seed=9), _logits(5, 29, seed=10)
    tau = 1.7
    hot = token_divergence(s, t, DivergenceSpec(divergence=divergence, beta=beta, temperature=tau))  # type: ignore[arg-type]
    cold = token_divergence(s / tau, t / tau, DivergenceSpec(divergence=divergence, beta=beta))  # type: ignore[arg-type]
    plain = token_divergence(s, t, DivergenceSpec(divergence=divergence, beta=beta))  # type: ignore[arg-type]
    torch.testing.assert_close(hot.loss, cold.loss)
    assert not torch.allclose(hot.loss, plain.loss)


# ---------------------------------------------------------------- top-k support


@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES)
def test_topk_renormalises_over_teacher_top_ids(divergence: str, beta: float) -> None:
    k, tau = 6, 1.3
    s, t = _logits(8, 31, seed=11), _logits(8, 31, seed=12)
    spec = DivergenceSpec(divergence=divergence, beta=beta, support="topk", topk=k, temperature=tau)  # type: ignore[arg-type]
    ids = torch.argsort(t, dim=-1, descending=True)[:, :k]
    ls = torch.log_softmax(s.gather(-1, ids) / tau, -1)
    lt = torch.log_softmax(t.gather(-1, ids) / tau, -1)
    ref_spec = DivergenceSpec(divergence=divergence, beta=beta)  # type: ignore[arg-type]
    # full support over the gathered k logits is the by-hand renormalised divergence
    expected = token_divergence(ls, lt, ref_spec).loss
    if divergence == "forward_kl":
        torch.testing.assert_close(expected, _kl(lt, ls))
    torch.testing.assert_close(token_divergence(s, t, spec).loss, expected)


def test_topk_with_k_equal_vocab_equals_full() -> None:
    s, t = _logits(6, 14, seed=13), _logits(6, 14, seed=14)
    for k in (14, 100):
        topk = token_divergence(s, t, DivergenceSpec(divergence="jsd", beta=0.4, support="topk", topk=k))
        full = token_divergence(s, t, DivergenceSpec(divergence="jsd", beta=0.4))
        torch.testing.assert_close(topk.loss, full.loss)


# ---------------------------------------------------------------- clipping


def test_pointwise_clip_clamps_each_term() -> None:
    c = 0.05
    s, t = _logits(9, 21, seed=15), _logits(9, 21, seed=16)
    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    terms = lt.exp() * (lt - ls)
    assert (terms > c).any() and (terms < 0).any()
    out = token_divergence(s, t, DivergenceSpec(clip="pointwise", clip_value=c))
    torch.testing.assert_close(out.loss, terms.clamp(max=c).sum(-1))
    torch.testing.assert_close(out.kl, terms.sum(-1))
    torch.testing.assert_close(out.clipped, (lt.exp() * (terms > c)).sum(-1))


def test_token_clip_clamps_per_token_sum() -> None:
    c = 1.5
    s, t = _logits(40, 12, seed=17), _logits(40, 12, seed=18)
    kl = _kl(torch.log_softmax(t, -1), torch.log_softmax(s, -1))
    assert (kl > c).any() and (kl < c).any()
    out = token_divergence(s, t, DivergenceSpec(clip="token", clip_value=c))
    torch.testing.assert_close(out.loss, kl.clamp(max=c))
    torch.testing.assert_close(out.kl, kl)
    torch.testing.assert_close(out.clipped, (kl > c).to(D64))


def test_pointwise_clip_can_push_the_teachers_favourite_down_and_the_token_clip_cannot() -> None:
    """Issue 13's example: p_T = (.6, .3, .05, .05), p_S = (.1, .5, .2, .2). Forward KL's gradient on the
    student logits is p_S - p_T = (-.5, .2, .15, .15): descent raises the teacher's favourite. The pointwise
    clip at 0.05 (the reference implementation's clamp of every vocabulary term) clips that token's term
    (.6 log 6 = 1.08) and leaves a gradient of +.04 there: descent *lowers* it. The token clip either keeps
    the whole gradient (KL under the clip) or drops the token; it never reverses a direction."""
    p_t, p_s = torch.tensor([[0.6, 0.3, 0.05, 0.05]], dtype=D64), torch.tensor([[0.1, 0.5, 0.2, 0.2]], dtype=D64)

    def grad(clip: str, value: float) -> torch.Tensor:
        s = p_s.log().clone().requires_grad_(True)
        token_divergence(s, p_t.log(), DivergenceSpec(clip=clip, clip_value=value)).loss.sum().backward()
        assert s.grad is not None
        return s.grad[0]

    torch.testing.assert_close(grad("none", 0.05), (p_s - p_t)[0])
    pointwise = grad("pointwise", 0.05)
    torch.testing.assert_close(pointwise, torch.tensor([0.04, -0.10, 0.03, 0.03], dtype=D64), atol=1e-12, rtol=0)
    assert pointwise[0] > 0 > (p_s - p_t)[0, 0]  # the wrong way on the teacher's favourite
    kl = float((p_t * (p_t.log() - p_s.log())).sum())  # 0.88
    torch.testing.assert_close(grad("token", 0.05), torch.zeros(4, dtype=D64))  # clipped: dropped
    torch.testing.assert_close(grad("token", kl + 0.01), (p_s - p_t)[0])  # under the clip: whole


@pytest.mark.parametrize("support", ["full", "topk", "sampled"])
@pytest.mark.parametrize("clip", ["pointwise", "token"])
def test_huge_clip_value_equals_no_clip(support: str, clip: str) -> None:
    t = _logits(7, 15, seed=20)
    ids = torch.randint(0, 15, (7,), generator=torch.Generator().manual_seed(2))
    grads, losses = [], []
    for spec in (
        DivergenceSpec(support=support, topk=4, clip=clip, clip_value=1e9),  # type: ignore[arg-type]
        DivergenceSpec(support=support, topk=4, clip="none"),  # type: ignore[arg-type]
    ):
        s = _logits(7, 15, seed=19).requires_grad_(True)
        out = token_divergence(s, t, spec, sampled_ids=ids)
        out.loss.sum().backward()
        assert torch.equal(out.clipped, torch.zeros(7, dtype=D64))
        losses.append(out.loss.detach())
        grads.append(s.grad)
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1])


def test_clipped_fraction_on_constructed_example() -> None:
    p_t = torch.tensor([[0.6, 0.3, 0.1]], dtype=D64)
    p_s = torch.tensor([[0.1, 0.3, 0.6]], dtype=D64)
    s, t = p_s.log(), p_t.log()
    # forward terms: 0.6 log 6 ~ 1.08, 0, 0.1 log(1/6) ~ -0.18 -> only the first is clipped at 0.5
    fwd = token_divergence(s, t, DivergenceSpec(divergence="forward_kl", clip="pointwise", clip_value=0.5))
    torch.testing.assert_close(fwd.clipped, torch.tensor([0.6], dtype=D64))
    torch.testing.assert_close(fwd.loss, torch.tensor([0.5 + 0.1 * math.log(1 / 6)], dtype=D64))
    # reverse terms are the mirror image, weighted by the student: the third (p_S = 0.6) is clipped
    rev = token_divergence(s, t, DivergenceSpec(divergence="reverse_kl", clip="pointwise", clip_value=0.5))
    torch.testing.assert_close(rev.clipped, torch.tensor([0.6], dtype=D64))
    # jsd weights by the mixture m = 0.5 (p_T + p_S): the terms are at most log 2 ~ 0.69
    p_s2 = torch.tensor([[0.2, 0.3, 0.5]], dtype=D64)
    m = 0.5 * (p_t + p_s2)
    terms = 0.5 * p_t * (p_t / m).log() + 0.5 * p_s2 * (p_s2 / m).log()  # ~0.052, 0, ~0.073
    c = 0.06
    expected = (m * (terms > c)).sum(-1)
    # only the last term is clipped; m, p_T and p_S give it different masses (0.3, 0.1, 0.5)
    torch.testing.assert_close(expected, torch.tensor([0.3], dtype=D64))
    jsd = token_divergence(p_s2.log(), t, DivergenceSpec(divergence="jsd", clip="pointwise", clip_value=c))
    torch.testing.assert_close(jsd.clipped, expected)
    # token clip: 1.0 when the per-token sum exceeds c, else 0.0
    for c_tok, flag in ((0.5, 1.0), (5.0, 0.0)):
        tok = token_divergence(s, t, DivergenceSpec(clip="token", clip_value=c_tok))
        torch.testing.assert_close(tok.clipped, torch.tensor([flag], dtype=D64))


def test_sampled_clip_clamps_advantage_magnitude() -> None:
    c = 0.2
    s, t = _logits(50, 9, seed=21), _logits(50, 9, seed=22)
    ids = torch.randint(0, 9, (50,), generator=torch.Generator().manual_seed(3))
    ls_y = torch.log_softmax(s, -1).gather(-1, ids[:, None]).squeeze(-1)
    lt_y = torch.log_softmax(t, -1).gather(-1, ids[:, None]).squeeze(-1)
    adv = lt_y - ls_y
    assert (adv > c).any() and (adv < -c).any() and (adv.abs() < c).any()
    for clip in ("pointwise", "token"):
        out = token_divergence(s, t, DivergenceSpec(support="sampled", clip=clip, clip_value=c), ids)  # type: ignore[arg-type]
        torch.testing.assert_close(out.loss, -adv.clamp(-c, c) * ls_y)
        torch.testing.assert_close(out.kl, ls_y - lt_y)
        torch.testing.assert_close(out.clipped, (adv.abs() > c).to(D64))


# ---------------------------------------------------------------- sampled estimator


def test_sampled_gradient_matches_reverse_kl_in_expectation() -> None:
    n_samples, rows, vocab, tau = 20_000, 3, 11, 1.3
    s0, t = _logits(rows, vocab, seed=23, scale=1.0), _logits(rows, vocab, seed=24, scale=1.0)
    s = s0.clone().requires_grad_(True)
    exact = token_divergence(s, t, DivergenceSpec(divergence="reverse_kl", temperature=tau)).loss.sum()
    (exact_grad,) = torch.autograd.grad(exact, s)

    p_s = torch.softmax(s0 / tau, -1)
    gen = torch.Generator().manual_seed(25)
    ids = torch.multinomial(p_s, n_samples, replacement=True, generator=gen).T  # [M, rows]
    s = s0.clone().requires_grad_(True)
    spec = DivergenceSpec(support="sampled", temperature=tau)
    est = token_divergence(s.expand(n_samples, rows, vocab), t.expand(n_samples, rows, vocab), spec, ids)
    (est_grad,) = torch.autograd.grad(est.loss.sum(0).sum() / n_samples, s)

    # per-sample gradients by hand (-A (onehot(y) - p_S) / tau) give the standard error of the mean
    adv = (torch.log_softmax(t / tau, -1) - torch.log_softmax(s0 / tau, -1)).gather(-1, ids.T).T  # [M, rows]
    per = -adv[..., None] * (torch.nn.functional.one_hot(ids, vocab).to(D64) - p_s) / tau
    torch.testing.assert_close(per.mean(0), est_grad)  # the estimator is exactly -A grad log p_S
    stderr = per.std(0) / math.sqrt(n_samples)
    assert (est_grad - exact_grad).abs().max() < 0.02 * exact_grad.abs().max()
    assert ((est_grad - exact_grad).abs() <= 5 * stderr + 1e-9).all()
    assert 5 * stderr.max() < 0.2 * exact_grad.abs().max()  # the tolerance is tight enough to mean something


# ---------------------------------------------------------------- gradient routing, reductions


@pytest.mark.parametrize("support", ["full", "topk", "sampled"])
def test_gradient_flows_only_into_student(support: str) -> None:
    s = _logits(4, 16, seed=26).requires_grad_(True)
    t = _logits(4, 16, seed=27).requires_grad_(True)
    ids = torch.randint(0, 16, (4,), generator=torch.Generator().manual_seed(4))
    spec = DivergenceSpec(divergence="jsd", beta=0.3, support=support, topk=5, clip="pointwise")  # type: ignore[arg-type]
    out = token_divergence(s, t, spec, sampled_ids=ids)
    out.loss.sum().backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert not out.kl.requires_grad and not out.clipped.requires_grad


def test_masked_mean_ignores_masked_positions() -> None:
    values = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), 6.0]], dtype=D64)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    torch.testing.assert_close(masked_mean(values, mask), torch.tensor(13.0 / 4, dtype=D64))
    torch.testing.assert_close(masked_mean(values.nan_to_num(0, 0), mask.to(D64), denom=10.0),
                               torch.tensor(1.3, dtype=D64))
    empty = masked_mean(values, torch.zeros_like(mask))
    assert float(empty) == 0.0


@pytest.mark.parametrize("support", ["full", "topk", "sampled"])
def test_global_denominator_over_micro_batches_equals_one_batch(support: str) -> None:
    s0, t = _logits(4, 6, 13, seed=28), _logits(4, 6, 13, seed=29)
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(5)) > 0.3
    ids = torch.randint(0, 13, (4, 6), generator=torch.Generator().manual_seed(6))
    spec = DivergenceSpec(support=support, topk=4, clip="pointwise", clip_value=0.1)  # type: ignore[arg-type]

    s_one = s0.clone().requires_grad_(True)
    loss_one, metrics_one = divergence_loss(s_one, t, mask, spec, sampled_ids=ids)
    loss_one.backward()

    s_acc = s0.clone().requires_grad_(True)
    total = mask.sum()
    loss_acc, kl_acc = torch.zeros((), dtype=D64), 0.0
    for part in (slice(0, 1), slice(1, 4)):  # unequal micro-batches: a per-micro-batch mean would differ
        loss, metrics = divergence_loss(
            s_acc[part], t[part], mask[part], spec, sampled_ids=ids[part], denom=total
        )
        loss.backward()
        loss_acc, kl_acc = loss_acc + loss.detach(), kl_acc + metrics["kl"]
    torch.testing.assert_close(loss_acc, loss_one.detach())
    torch.testing.assert_close(s_acc.grad, s_one.grad)
    assert kl_acc == pytest.approx(metrics_one["kl"])
    assert set(metrics_one) == {"kl", "clipped_frac"} and isinstance(metrics_one["kl"], float)


# ---------------------------------------------------------------- config and validation


def test_spec_from_config_and_validation() -> None:
    spec = DivergenceSpec.from_config(OPSDConfig(), sampling_temperature=1.1)
    assert spec.temperature == 1.1 and spec.clip == "pointwise" and spec.divergence == "forward_kl"
    cfg = OPSDConfig(temperature=0.7, divergence="jsd", beta=0.2, support="topk", topk=7, clip_value=0.3)
    spec = DivergenceSpec.from_config(cfg, sampling_temperature=1.1)
    assert (spec.temperature, spec.divergence, spec.beta, spec.support, spec.topk, spec.clip_value) == (
        0.7, "jsd", 0.2, "topk", 7, 0.3,
    )
    for bad in ({"beta": 1.5}, {"topk": 0}, {"clip_value": 0.0}, {"temperature": -1.0}, {"support": "x"}):
        with pytest.raises(ValueError):
            DivergenceSpec(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sampled_ids"):
        token_divergence(_logits(2, 5), _logits(2, 5), DivergenceSpec(support="sampled"))


# ---------------------------------------------------------------- chunked path


def _hidden_case(seed: int, b: int = 3, t: int = 7, h: int = 8, v: int = 23, bias: bool = True) -> dict:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, t, generator=gen) > 0.35
    mask[0, 2] = mask[1, 0] = mask[2, -1] = False  # holes at the start, middle and end of rows
    mask[0, 0] = True
    return {
        "hs": torch.randn(b, t, h, generator=gen, dtype=D64),
        "ht": torch.randn(b, t, h, generator=gen, dtype=D64),
        "w": torch.randn(v, h, generator=gen, dtype=D64),
        "b": torch.randn(v, generator=gen, dtype=D64) if bias else None,
        "mask": mask,
        "ids": torch.randint(0, v, (b, t), generator=gen),
    }


def _reference(case: dict, spec: DivergenceSpec, teacher_w: torch.Tensor | None = None) -> tuple:
    hs, w = case["hs"].clone().requires_grad_(True), case["w"].clone().requires_grad_(True)
    b = None if case["b"] is None else case["b"].clone().requires_grad_(True)
    s_logits = hs @ w.T + (0 if b is None else b)
    tw = w.detach() if teacher_w is None else teacher_w
    t_logits = case["ht"] @ tw.T + (0 if b is None else b.detach())
    loss, metrics = divergence_loss(s_logits, t_logits, case["mask"], spec, sampled_ids=case["ids"])
    loss.backward()
    return loss.detach(), metrics, hs.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize(("support", "clip"), list(itertools.product(["full", "topk", "sampled"],
                                                                      ["none", "pointwise", "token"])))
@pytest.mark.parametrize(("divergence", "beta"), [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_chunked_matches_full_tensor_reference(support: str, clip: str, divergence: str, beta: float) -> None:
    spec = DivergenceSpec(divergence=divergence, beta=beta, support=support, topk=5, clip=clip,  # type: ignore[arg-type]
                          clip_value=0.1, temperature=1.2)
    case = _hidden_case(seed=30)
    ref_loss, ref_metrics, ref_dh, ref_dw, ref_db = _reference(case, spec)
    n = int(case["mask"].sum())
    for chunk in (1, 3, n + 5):
        hs, w = case["hs"].clone().requires_grad_(True), case["w"].clone().requires_grad_(True)
        b = case["b"].clone().requires_grad_(True)
        ht = case["ht"].clone().requires_grad_(True)
        loss, metrics = chunked_divergence_loss(hs, ht, w, case["mask"], spec, sampled_ids=case["ids"],
                                                chunk_size=chunk, lm_head_bias=b)
        loss.backward()
        torch.testing.assert_close(loss.detach(), ref_loss)
        torch.testing.assert_close(hs.grad, ref_dh)
        torch.testing.assert_close(w.grad, ref_dw)
        torch.testing.assert_close(b.grad, ref_db)
        assert ht.grad is None
        assert float(metrics["tokens"]) == n
        assert float(metrics["kl_sum"]) / n == pytest.approx(ref_metrics["kl"])
        assert float(metrics["clipped_sum"]) / n == pytest.approx(ref_metrics["clipped_frac"])
        assert not any(m.requires_grad for m in metrics.values())
        assert torch.equal(hs.grad[~case["mask"]], torch.zeros_like(hs.grad[~case["mask"]]))


def test_chunked_separate_teacher_head_frozen_weight_and_denominator() -> None:
    case = _hidden_case(seed=31, bias=False)
    spec = DivergenceSpec(divergence="jsd", beta=0.5, clip="token", clip_value=0.5)
    teacher_w = torch.randn_like(case["w"]).requires_grad_(True)
    ref_loss, _, ref_dh, _, _ = _reference(case, spec, teacher_w=teacher_w.detach())
    hs = case["hs"].clone().requires_grad_(True)
    n = int(case["mask"].sum())
    loss, _ = chunked_divergence_loss(hs, case["ht"], case["w"], case["mask"], spec, chunk_size=4,
                                      denom=2 * n, teacher_lm_head_weight=teacher_w)
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss / 2)
    torch.testing.assert_close(hs.grad, ref_dh / 2)
    assert teacher_w.grad is None and case["w"].grad is None
    # no valid token: zero loss, zero gradient, no NaN
    hs.grad = None
    empty, metrics = chunked_divergence_loss(hs, case["ht"], case["w"], torch.zeros_like(case["mask"]), spec)
    empty.backward()
    assert float(empty.detach()) == 0.0 and float(metrics["tokens"]) == 0.0
    assert torch.equal(hs.grad, torch.zeros_like(hs))


def test_chunked_bf16_inputs_compute_in_fp32() -> None:
    case = _hidden_case(seed=32)
    hs = case["hs"].to(torch.bfloat16).requires_grad_(True)
    w = case["w"].to(torch.bfloat16).requires_grad_(True)
    spec = DivergenceSpec()
    loss, _ = chunked_divergence_loss(hs, case["ht"].to(torch.bfloat16), w, case["mask"], spec, chunk_size=4)
    loss.backward()
    assert loss.dtype == torch.float32 and hs.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    up = {**case, "hs": hs.detach().to(D64), "ht": case["ht"].to(torch.bfloat16).to(D64),
          "w": w.detach().to(D64), "b": None}
    ref_loss, _, ref_dh, _, _ = _reference(up, spec)
    torch.testing.assert_close(loss.to(D64), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hs.grad.to(D64), ref_dh, rtol=2e-2, atol=1e-3)


def test_chunked_graph_never_saves_a_full_logits_tensor() -> None:
    case = _hidden_case(seed=33, b=4, t=12, h=8, v=50)
    n, v = int(case["mask"].sum()), 50
    assert n > 4 * 4 and n > 8  # N > chunk, and N > H so that the stashed [V, H] grad is smaller than N*V

    def record(spec: DivergenceSpec, chunked: bool) -> int:
        sizes: list[int] = []

        def pack(x: torch.Tensor) -> torch.Tensor:
            sizes.append(x.numel())
            return x

        hs, w = case["hs"].clone().requires_grad_(True), case["w"].clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            if chunked:
                loss, _ = chunked_divergence_loss(hs, case["ht"], w, case["mask"], spec, chunk_size=4)
            else:
                s = hs @ w.T
                loss, _ = divergence_loss(s, case["ht"] @ w.detach().T, case["mask"], spec)
        loss.backward()
        return max(sizes)

    for spec in (DivergenceSpec(clip="pointwise"), DivergenceSpec(divergence="jsd", support="topk", topk=50)):
        assert record(spec, chunked=False) >= n * v  # the hooks do see the reference's full logits
        assert record(spec, chunked=True) < n * v
