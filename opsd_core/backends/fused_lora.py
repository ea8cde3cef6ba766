"""The student's pass over a LoRA model with its frozen weights packed for oneDNN (CPU).

Within :func:`installed`, each plain LoRA linear computes ``y = x W₀ᵀ + s (x Aᵀ) Bᵀ`` as one
autograd node: the frozen ``W₀`` through its oneDNN pack, the scale folded into the rank-r
product (``addmm`` into the base output), and a hand-written backward

    gx = g W₀ + s (g B) A,    gA = s (g B)ᵀ x,    gB = s gᵀ (x Aᵀ)

instead of peft's six nodes (dropout, A, B, scale, add, base) with their full-size temporaries
for the scale and the sum. Other frozen linears run through their packs; LoRA layers this path
does not cover (dropout, DoRA and other variants, several active adapters, merged or disabled
adapters, a bias on B, dtype casts) keep peft's forward, with the base layer still packed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from opsd_core.backends.packs import LinearPacks, PackedLinear
from opsd_core.models.lora import is_lora_layer, plain_adapter


class _LoraLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, a: Tensor, b: Tensor, base: PackedLinear, scaling: float) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        u = x2 @ a.t()  # [M, r]
        y = base.forward_no_grad(x2)  # a fresh [M, out] buffer: the low-rank term is added in place
        y.addmm_(u, b.t(), alpha=scaling)
        ctx.save_for_backward(x2, u, a, b)
        ctx.base, ctx.scaling, ctx.shape = base, scaling, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x2, u, a, b = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])
        gb_ = g @ b  # [M, r]
        gx = ga = gb = None
        if ctx.needs_input_grad[0]:
            gx = ctx.base.input_grad(g)
            gx.addmm_(gb_, a, alpha=s)
            gx = gx.view(ctx.shape)
        if ctx.needs_input_grad[1]:
            ga = torch.mm(gb_.t(), x2).mul_(s)
        if ctx.needs_input_grad[2]:
            gb = torch.mm(g.t(), u).mul_(s)
        return gx, ga, gb, None, None


def _lora_forward(layer: nn.Module, name: str, packs: LinearPacks) -> Callable[..., Tensor]:
    peft_forward = type(layer).forward

    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        base = None if args or kwargs else packs.get(layer.base_layer)
        if base is None:
            return peft_forward(layer, x, *args, **kwargs)
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        if not (x.dtype == a.dtype == b.dtype == base.weight.dtype):
            return peft_forward(layer, x, *args, **kwargs)
        return _LoraLinearFn.apply(x, a, b, base, float(layer.scaling[name]))

    return forward


def _linear_forward(linear: nn.Module, packs: LinearPacks) -> Callable[[Tensor], Tensor]:
    def forward(x: Tensor) -> Tensor:
        pack = packs.get(linear)
        return pack(x) if pack is not None else F.linear(x, linear.weight, linear.bias)

    return forward


@contextmanager
def installed(model: nn.Module, packs: LinearPacks) -> Iterator[None]:
    """Within the block, ``model``'s LoRA linears and other frozen linears run through ``packs``.

    The forwards are instance attributes, removed on exit. Packs are made on first use, so layers
    never called (an lm head only the loss reads) cost nothing.
    """
    patched = []
    for m in model.modules():
        if is_lora_layer(m):
            name = plain_adapter(m)  # the adapter state cannot change within the block: decided once
            if name is None or not packs.wants(m.base_layer):
                continue  # peft's forward as it is (over the packed base when that is big enough)
            m.forward = _lora_forward(m, name, packs)
        elif packs.wants(m):
            m.forward = _linear_forward(m, packs)
        else:
            continue
        patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward
