"""Per-token OPSD divergences between student and teacher next-token distributions.

Pure tensor functions (torch only). Shapes: ``V`` vocabulary, ``N`` tokens (any leading shape is
flattened to ``N``), ``H`` hidden size. All math runs in fp32 (fp64 inputs stay fp64, which the tests use).

Divergences (DESIGN.md section 5.4), with ``p = softmax(logits / temperature)``:

* ``forward_kl``  KL(p_T || p_S) = sum_v p_T (log p_T - log p_S)
* ``reverse_kl``  KL(p_S || p_T) = sum_v p_S (log p_S - log p_T)
* ``jsd``         beta KL(p_T || m) + (1 - beta) KL(p_S || m), m = beta p_T + (1 - beta) p_S;
  ``beta == 0`` is forward KL and ``beta == 1`` reverse KL exactly (the mixture formula vanishes there).

Supports: ``full`` vocabulary; ``topk`` the teacher's top-k ids with both distributions renormalised over
that set; ``sampled`` only the sampled token ``y``: advantage ``A = stopgrad(log p_T(y) - log p_S(y))`` and
loss ``-A log p_S(y)``, whose gradient is the reverse-KL gradient in expectation over ``y ~ p_S``. For
``sampled`` the reported ``kl`` is the single-sample reverse-KL estimate ``log p_S(y) - log p_T(y)``, and the
loss *value* is a surrogate (only its gradient is meaningful).

Clipping: ``pointwise`` clamps every vocabulary term of the sum at ``clip_value`` (max only) before summing;
a clipped term gets zero gradient, so when other terms are negative the clipped token can be pushed the
wrong way (the reference's behaviour, kept on purpose). ``token`` clamps the per-token sum (max only).
For ``sampled`` both clamp the advantage to ``[-clip_value, clip_value]``.

Weighting distribution for the clipped-mass fraction: ``p_T`` (forward), ``p_S`` (reverse), ``m`` (jsd).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from opsd_core.config import OPSDConfig

__all__ = [
    "DivergenceSpec",
    "TokenDivergence",
    "chunked_divergence_loss",
    "contrastive_teacher_logits",
    "divergence_loss",
    "masked_mean",
    "token_divergence",
    "token_nll_sum",
]

_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
_SUPPORTS = ("full", "topk", "sampled")
_CLIPS = ("none", "pointwise", "token")


@dataclass(frozen=True)
class DivergenceSpec:
    """What per-token divergence to compute (see the module docstring for the meaning of each field)."""

    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = 0.5
    support: Literal["full", "topk", "sampled"] = "full"
    topk: int = 20
    clip: Literal["none", "pointwise", "token"] = "none"
    clip_value: float = 0.05
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.divergence not in _DIVERGENCES:
            raise ValueError(f"divergence must be one of {_DIVERGENCES}, got {self.divergence!r}")
        if self.support not in _SUPPORTS:
            raise ValueError(f"support must be one of {_SUPPORTS}, got {self.support!r}")
        if self.clip not in _CLIPS:
            raise ValueError(f"clip must be one of {_CLIPS}, got {self.clip!r}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        if self.topk < 1:
            raise ValueError(f"topk must be >= 1, got {self.topk}")
        if not self.clip_value > 0:
            raise ValueError(f"clip_value must be > 0, got {self.clip_value}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    @classmethod
    def from_config(cls, cfg: OPSDConfig, sampling_temperature: float) -> DivergenceSpec:
        """Build from ``params.opsd``; ``cfg.temperature is None`` means the sampling temperature."""
        temperature = cfg.temperature if cfg.temperature is not None else sampling_temperature
        return cls(
            divergence=cfg.divergence, beta=cfg.beta, support=cfg.support, topk=cfg.topk,
            clip=cfg.clip, clip_value=cfg.clip_value, temperature=float(temperature),
        )


@dataclass
class TokenDivergence:
    """Per-token results, each with the logits' leading shape, fp32 (fp64 for fp64 inputs).

    ``loss``: the value to minimise (after clipping; carries the student gradient).
    ``kl``: the unclipped divergence (detached, for logging).
    ``clipped``: the clipped-mass fraction (detached).
    """

    loss: Tensor
    kl: Tensor
    clipped: Tensor


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _divergence_terms(ls: Tensor, lt: Tensor, spec: DivergenceSpec) -> tuple[Tensor, Tensor]:
    """Per-vocabulary terms of the divergence sum and the weighting distribution.

    ls, lt: [N, K] student / teacher log-probabilities (lt detached). Returns (terms [N, K], weights [N, K]).
    """
    kind, beta = spec.divergence, spec.beta
    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"
    elif kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    if kind == "forward_kl":
        pt = lt.exp()
        return pt * (lt - ls), pt
    if kind == "reverse_kl":
        ps = ls.exp()
        return ps * (ls - lt), ps
    # log m in log space: the mixture of two tiny probabilities must not underflow to log(0)
    lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
    terms = beta * lt.exp() * (lt - lm) + (1.0 - beta) * ls.exp() * (ls - lm)
    return terms, lm.exp()


def _dense_divergence(ls: Tensor, lt: Tensor, spec: DivergenceSpec) -> TokenDivergence:
    """ls, lt: [N, K] log-probabilities over the support. Returns [N] loss / kl / clipped."""
    terms, weights = _divergence_terms(ls, lt, spec)
    kl = terms.sum(-1)
    if spec.clip == "pointwise":
        over = terms.detach() > spec.clip_value
        loss = terms.clamp(max=spec.clip_value).sum(-1)
        clipped = (weights.detach() * over).sum(-1)
    elif spec.clip == "token":
        loss = kl.clamp(max=spec.clip_value)
        clipped = (kl.detach() > spec.clip_value).to(kl.dtype)
    else:
        loss = kl
        clipped = torch.zeros_like(kl)
    return TokenDivergence(loss=loss, kl=kl.detach(), clipped=clipped.detach())


def _sampled_divergence(ls_y: Tensor, lt_y: Tensor, spec: DivergenceSpec) -> TokenDivergence:
    """ls_y, lt_y: [N] log-probabilities of the sampled tokens. Returns [N] loss / kl / clipped."""
    advantage = (lt_y - ls_y).detach()
    clipped = torch.zeros_like(advantage)
    if spec.clip != "none":
        clipped = (advantage.abs() > spec.clip_value).to(advantage.dtype)
        advantage = advantage.clamp(-spec.clip_value, spec.clip_value)
    return TokenDivergence(loss=-advantage * ls_y, kl=(ls_y - lt_y).detach(), clipped=clipped)


def token_divergence(
    student_logits: Tensor, teacher_logits: Tensor, spec: DivergenceSpec, sampled_ids: Tensor | None = None,
) -> TokenDivergence:
    """Per-token divergence between student and teacher.

    student_logits, teacher_logits: [..., V] (any dtype; cast to fp32, fp64 kept). The teacher is detached.
    sampled_ids: [...] integer token ids, required for ``support="sampled"``.
    Returns a :class:`TokenDivergence` whose tensors have shape [...].
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"logit shapes differ: {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}"
        )
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    dtype = _compute_dtype(student_logits, teacher_logits)
    s = student_logits.reshape(-1, vocab).to(dtype) / spec.temperature
    t = teacher_logits.detach().reshape(-1, vocab).to(dtype) / spec.temperature
    if spec.support == "sampled":
        if sampled_ids is None:
            raise ValueError('support="sampled" needs sampled_ids')
        if sampled_ids.shape != lead:
            raise ValueError(f"sampled_ids shape {tuple(sampled_ids.shape)} != logits lead {tuple(lead)}")
        ids = sampled_ids.reshape(-1, 1).long()
        ls_y = torch.log_softmax(s, -1).gather(-1, ids).squeeze(-1)
        lt_y = torch.log_softmax(t, -1).gather(-1, ids).squeeze(-1)
        out = _sampled_divergence(ls_y, lt_y, spec)
    else:
        if spec.support == "topk" and spec.topk < vocab:
            ids = t.topk(spec.topk, dim=-1).indices
            s, t = s.gather(-1, ids), t.gather(-1, ids)
        out = _dense_divergence(torch.log_softmax(s, -1), torch.log_softmax(t, -1), spec)
    return TokenDivergence(
        loss=out.loss.reshape(lead), kl=out.kl.reshape(lead), clipped=out.clipped.reshape(lead)
    )


def contrastive_teacher_logits(student_logits: Tensor, teacher_logits: Tensor, wrong_logits: Tensor,
                               weight: float, temperature: float, plausibility: float = 0.0) -> Tensor:
    """The contrastive target: what the correct solution changes in the teacher beyond what any solution does.

    student_logits, teacher_logits (the correct solution in the context), wrong_logits (another problem's
    solution): [..., V]. At temperature ``T`` the target is ``q ∝ p_S · (p_T / p_W)^weight``: where both
    teachers move the same way (the privileged context's style, the drift a shuffled control shows too) the
    ratio is 1 and the target is the student itself, so nothing is learnt from it; what depends on the
    solution being right remains. ``weight`` 0: the student (no signal); with a wrong teacher equal to the
    student and weight 1: the plain teacher.

    ``plausibility`` α > 0: a token the right teacher itself finds implausible (``p_T < α · max p_T``, the
    adaptive plausibility constraint of contrastive decoding) may be pushed down by the ratio but never
    raised. Without it the ratio explodes in the tails: where both teachers are sure of a shared format token
    (``####``), every rare alternative the wrong teacher rules out a little harder gets a large ratio, and the
    target drops the format (seen in the study: strict accuracy 0). α 0: the plain ratio everywhere.
    Returns logits [..., V] (detached) that, divided by ``T`` as the divergence does, give ``log q`` up to a
    constant.
    """
    dtype = _compute_dtype(student_logits, teacher_logits, wrong_logits)
    ls = torch.log_softmax(student_logits.detach().to(dtype) / temperature, -1)
    lt = torch.log_softmax(teacher_logits.detach().to(dtype) / temperature, -1)
    lw = torch.log_softmax(wrong_logits.detach().to(dtype) / temperature, -1)
    ratio = lt - lw
    if plausibility > 0:
        implausible = lt < lt.amax(-1, keepdim=True) + math.log(plausibility)
        ratio = torch.where(implausible, ratio.clamp(max=0), ratio)
    return temperature * torch.log_softmax(ls + weight * ratio, -1)


def _default_denom(mask: Tensor) -> Tensor:
    # an empty mask gives 0 / 1 = 0 instead of NaN
    return mask.sum().clamp(min=1)


def masked_mean(values: Tensor, mask: Tensor, denom: float | Tensor | None = None) -> Tensor:
    """``sum(values * mask) / denom``; values, mask: same shape [...]; returns a scalar.

    denom defaults to ``mask.sum()`` (at least 1). Pass the token count of the whole optimizer step to get
    the global token mean when summing over gradient-accumulation micro-batches. Masked positions are
    excluded with ``where`` for boolean masks, so NaN/inf there cannot leak into the result.
    """
    if mask.dtype == torch.bool:
        total = torch.where(mask, values, torch.zeros_like(values)).sum()
    else:
        total = (values * mask.to(values.dtype)).sum()
    return total / (_default_denom(mask) if denom is None else denom)


def divergence_loss(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, spec: DivergenceSpec,
    sampled_ids: Tensor | None = None, denom: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Per-token divergence then masked mean.

    logits: [..., V]; mask: [...] (bool or 0/1); sampled_ids: [...] for ``sampled``.
    Returns (scalar loss, {"kl": ..., "clipped_frac": ...}). The metrics use the same denominator as the
    loss, so with a global ``denom`` they add up across micro-batches exactly as the loss does.
    """
    out = token_divergence(student_logits, teacher_logits, spec, sampled_ids)
    loss = masked_mean(out.loss, mask, denom)
    metrics = {
        "kl": float(masked_mean(out.kl, mask, denom)),
        "clipped_frac": float(masked_mean(out.clipped, mask, denom)),
    }
    return loss, metrics


class _ChunkedDivergence(torch.autograd.Function):
    """Sum of per-token losses over [N, H] hidden rows, computed chunk by chunk.

    Gradients are computed chunk-wise during forward (one logits chunk alive at a time) and stashed:
    d_hidden [N, H] and d_weight / d_bias [V, H] / [V] in the compute dtype; backward only scales them by
    the incoming scalar gradient. Memory is O(chunk * V + N * H + V * H).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, hs: Tensor, ht: Tensor, weight: Tensor,
        bias: Tensor | None, t_weight: Tensor | None, sampled: Tensor | None,
        spec: DivergenceSpec, chunk_size: int, needs: tuple[bool, bool, bool],
        hw: Tensor | None = None, contrast: float = 0.0, plausibility: float = 0.0,
    ) -> tuple[Tensor, Tensor, Tensor]:
        need_h, need_w, need_b = needs
        dtype = _compute_dtype(hs, weight)
        # one upcast copy of the head per call: fp32 logits avoid the bf16 log-softmax trap
        w = weight.detach().to(dtype).requires_grad_(need_w)
        b = None if bias is None else bias.detach().to(dtype).requires_grad_(need_b)
        tw = w.detach() if t_weight is None else t_weight.detach().to(dtype)
        tb = None if b is None else b.detach()
        n = hs.shape[0]
        sums = torch.zeros(3, dtype=dtype, device=hs.device)  # loss, kl, clipped
        d_h = torch.zeros(n, hs.shape[1], dtype=dtype, device=hs.device) if need_h else None
        d_w = torch.zeros_like(w) if need_w else None
        d_b = torch.zeros_like(b) if need_b and b is not None else None
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            with torch.no_grad():
                t_logits = F.linear(ht[start:stop].detach().to(dtype), tw, tb)
            with torch.enable_grad():
                h = hs[start:stop].detach().to(dtype).requires_grad_(need_h)
                ids = None if sampled is None else sampled[start:stop]
                s_logits = F.linear(h, w, b)
                if hw is not None:
                    with torch.no_grad():
                        w_logits = F.linear(hw[start:stop].detach().to(dtype), tw, tb)
                        t_logits = contrastive_teacher_logits(s_logits, t_logits, w_logits, contrast, spec.temperature,
                                                              plausibility)
                out = token_divergence(s_logits, t_logits, spec, ids)
                chunk_loss = out.loss.sum()
                wrt = [x for x, need in ((h, need_h), (w, need_w), (b, need_b)) if need and x is not None]
                grads = list(torch.autograd.grad(chunk_loss, wrt)) if wrt and chunk_loss.requires_grad else []
            sums += torch.stack([chunk_loss.detach(), out.kl.sum(), out.clipped.sum()])
            if grads and need_h:
                d_h[start:stop] = grads.pop(0)  # type: ignore[index]
            if grads and need_w:
                d_w += grads.pop(0)  # type: ignore[operator]
            if grads and d_b is not None:
                d_b += grads.pop(0)
        ctx.save_for_backward(d_h, d_w, d_b)
        ctx.in_dtypes = (hs.dtype, weight.dtype, None if bias is None else bias.dtype)
        kl_sum, clipped_sum = sums[1].clone(), sums[2].clone()
        ctx.mark_non_differentiable(kl_sum, clipped_sum)
        return sums[0].clone(), kl_sum, clipped_sum

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, g: Tensor, _g_kl: Tensor, _g_clip: Tensor,
    ) -> tuple[Tensor | None, ...]:
        d_h, d_w, d_b = ctx.saved_tensors  # type: ignore[attr-defined]
        h_dtype, w_dtype, b_dtype = ctx.in_dtypes  # type: ignore[attr-defined]
        gh = None if d_h is None else (d_h * g).to(h_dtype)
        gw = None if d_w is None else (d_w * g).to(w_dtype)
        gb = None if d_b is None else (d_b * g).to(b_dtype)
        return gh, None, gw, gb, None, None, None, None, None, None, None, None


def chunked_divergence_loss(
    student_hidden: Tensor, teacher_hidden: Tensor, lm_head_weight: Tensor, mask: Tensor,
    spec: DivergenceSpec, sampled_ids: Tensor | None = None, chunk_size: int = 128,
    denom: float | Tensor | None = None, lm_head_bias: Tensor | None = None,
    teacher_lm_head_weight: Tensor | None = None, contrast_hidden: Tensor | None = None,
    contrast_weight: float = 1.0, contrast_plausibility: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Masked-mean divergence from final hidden states without materialising [B, T, V] logits.

    student_hidden, teacher_hidden: [B, T, H] final-norm outputs at completion positions; lm_head_weight
    [V, H] (lm_head_bias [V]) used for both (teacher side detached) unless teacher_lm_head_weight [V, H] is
    given; mask [B, T] (true = valid token); sampled_ids [B, T] for ``sampled``.
    Only valid rows are projected, ``chunk_size`` rows at a time, in fp32. Gradients reach student_hidden,
    lm_head_weight and lm_head_bias (when they require grad); the teacher gets none.
    ``contrast_hidden`` [B, T, H]: the teacher's hidden states under a wrong solution; the divergence is
    then taken to :func:`contrastive_teacher_logits` with ``contrast_weight`` and ``contrast_plausibility``
    instead of the plain teacher.
    Returns (sum of per-token losses / denom, {"kl_sum", "clipped_sum", "tokens"} detached scalars);
    denom defaults to the number of valid tokens (at least 1).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if student_hidden.shape != teacher_hidden.shape or student_hidden.shape[:-1] != mask.shape:
        raise ValueError(
            f"shape mismatch: student {tuple(student_hidden.shape)}, teacher {tuple(teacher_hidden.shape)}, "
            f"mask {tuple(mask.shape)}"
        )
    hidden = student_hidden.shape[-1]
    rows = mask.reshape(-1).bool().nonzero().squeeze(1)
    hs = student_hidden.reshape(-1, hidden).index_select(0, rows)
    ht = teacher_hidden.detach().reshape(-1, hidden).index_select(0, rows)
    hw = None
    if contrast_hidden is not None:
        if contrast_hidden.shape != teacher_hidden.shape:
            raise ValueError(f"contrast_hidden {tuple(contrast_hidden.shape)} != teacher {tuple(teacher_hidden.shape)}")
        hw = contrast_hidden.detach().reshape(-1, hidden).index_select(0, rows)
    sampled = None
    if spec.support == "sampled":
        if sampled_ids is None:
            raise ValueError('support="sampled" needs sampled_ids')
        sampled = sampled_ids.reshape(-1).index_select(0, rows)
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and hs.requires_grad,
        grad_on and lm_head_weight.requires_grad,
        grad_on and lm_head_bias is not None and lm_head_bias.requires_grad,
    )
    loss_sum, kl_sum, clipped_sum = _ChunkedDivergence.apply(
        hs, ht, lm_head_weight, lm_head_bias, teacher_lm_head_weight, sampled, spec, chunk_size, needs,
        hw, contrast_weight, contrast_plausibility,
    )
    tokens = torch.tensor(float(rows.numel()), dtype=loss_sum.dtype, device=loss_sum.device)
    loss = loss_sum / (tokens.clamp(min=1) if denom is None else denom)
    return loss, {"kl_sum": kl_sum.detach(), "clipped_sum": clipped_sum.detach(), "tokens": tokens}


def token_nll_sum(hidden: Tensor, lm_head_weight: Tensor, targets: Tensor, mask: Tensor,
                  chunk_size: int = 128) -> Tensor:
    """Summed negative log-likelihood of ``targets`` (the SFT loss before its token mean), in fp32.

    hidden: [B, T, H] final hidden states predicting each target; lm_head_weight: [V, H]; targets: [B, T]
    token ids; mask: [B, T] (true = a target to score). Only valid rows are projected, ``chunk_size`` at a
    time, so the logits of padding are never formed. Returns a scalar with gradients to ``hidden`` and
    the head.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.shape[:-1] != targets.shape or targets.shape != mask.shape:
        raise ValueError(f"shape mismatch: hidden {tuple(hidden.shape)}, targets {tuple(targets.shape)}, "
                         f"mask {tuple(mask.shape)}")
    rows = mask.reshape(-1).bool().nonzero().squeeze(1)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
    y = targets.reshape(-1).index_select(0, rows).long()
    dtype = _compute_dtype(h, lm_head_weight)
    w = lm_head_weight.to(dtype)
    total = torch.zeros((), dtype=dtype, device=hidden.device)
    for start in range(0, h.shape[0], chunk_size):
        logits = F.linear(h[start:start + chunk_size].to(dtype), w)
        total = total + F.cross_entropy(logits, y[start:start + chunk_size], reduction="sum")
    return total
