"""A low-precision sampler copy that keeps the policy's LoRA delta unmerged, so bf16 rollouts stay on-policy.

A bf16 copy of the merged weight ``W0 + s·B·A`` rounds the delta away while it is below bf16's resolution of
``W0`` (~2⁻⁹ relative), which is where training starts. Adding an fp32 low-rank product to the *rounded*
bf16 base product, as peft's forward does, loses it the same way: the rounded base lies on bf16's grid, and
an addend below half a step rounds back onto the same point.

So here the low-rank product joins the base product inside one matrix product, ahead of its single
rounding: ``y = [x | x·(s·A)ᵀ] · [W0 | B]ᵀ``. A bf16 product accumulates in fp32 (oneDNN and MKL on a CPU,
cuBLAS on a GPU), so the r extra columns add the delta at its own scale, and only the sum is rounded. The
factors are stored coarsely (``x·(s·A)ᵀ`` rounded to bf16, ``B`` in bf16): a relative error of ~2⁻⁹ *of the
delta*, not of the weights. How much of the fp32 policy's change in logits a bf16 sampler carries
(regression slope, delta of rms 1e-5 on weights of rms 2e-2, ``tests/test_bf16_sampler.py``): 1.03 this
way, 0.34 for the merged bf16 copy sampled before, ~0.3 for peft's bf16 forward. (A 4-layer, 576-wide
Llama: 1.08 this way, 1.10 for an fp32 product rounded once, 0.30 merged, 0.30 peft's way.) Cost: r more
columns per adapted matrix (~3 % of a 2048-wide layer at r = 64), a rank-r product of the input, and no
fusing of q/k/v or gate/up in the engine for these layers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from opsd_core.models.lora import lora_layers, plain_lora

PEFT_PREFIX = "base_model.model."


class DeltaLinear(nn.Module):
    """``y = x·W0ᵀ + (x·(s·A)ᵀ)·Bᵀ + b`` as one product ``[x | x·(s·A)ᵀ]·[W0 | B]ᵀ + b`` (see the module).

    weight: [out, in + r] in the sampling dtype (``W0`` in the first ``in`` columns, ``B`` in the last r);
    scaled_a: [r, in] fp32 (``s·A``); bias: [out] or None. Frozen: :meth:`set_delta` writes new factors.
    """

    def __init__(self, base: nn.Linear, rank: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = base.in_features, base.out_features, rank
        dev = base.weight.device
        weight = torch.zeros(self.out_features, self.in_features + rank, dtype=dtype, device=dev)
        weight[:, :self.in_features] = base.weight.detach()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().to(dtype), requires_grad=False)
        self.register_buffer("scaled_a", torch.zeros(rank, self.in_features, dtype=torch.float32, device=dev))

    @torch.no_grad()
    def set_delta(self, a: Tensor, b: Tensor, scale: float) -> None:
        """The adapter's factors: ``a`` [r, in], ``b`` [out, r] (any dtype), ``scale`` s."""
        self.scaled_a.copy_(a.float() * scale)
        self.weight[:, self.in_features:].copy_(b)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in] → [..., out] in x's dtype."""
        u = F.linear(x.float(), self.scaled_a).to(x.dtype)  # [..., r]
        return F.linear(torch.cat([x, u], dim=-1), self.weight, self.bias)


def adapter_of(layer: nn.Module) -> str | None:
    """The one active plain LoRA adapter of a peft layer (dropout does not matter: the sampler runs in eval),
    or None where the delta is not ``s·B·A`` on a linear (DoRA, variants, several adapters, merged)."""
    if layer.disable_adapters or layer.merged:
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1 or not plain_lora(layer, active[0]) or layer.lora_B[active[0]].bias is not None:
        return None
    return active[0]


def unmergeable(model: nn.Module) -> bool:
    """Whether every LoRA layer of the peft ``model`` is one :class:`DeltaLinear` can carry."""
    layers = lora_layers(model)
    return bool(layers) and all(adapter_of(m) is not None for m in layers.values())


def unmerged_copy(model: nn.Module, dtype: torch.dtype) -> tuple[nn.Module, dict[str, DeltaLinear]]:
    """A frozen copy of the peft ``model``'s base in ``dtype``, each LoRA linear replaced by a
    :class:`DeltaLinear` (its delta zero until set) → (copy, {policy's layer name: its DeltaLinear})."""
    names = list(lora_layers(model))
    plain = copy.deepcopy(model).unload().to(dtype)  # adapters dropped: the factors come from the policy
    deltas: dict[str, DeltaLinear] = {}
    for name in names:
        inner = name.removeprefix(PEFT_PREFIX)
        layer = model.get_submodule(name)
        rank = layer.lora_A[adapter_of(layer)].weight.shape[0]
        deltas[name] = DeltaLinear(plain.get_submodule(inner), rank, dtype)
        plain.set_submodule(inner, deltas[name])
    return plain.eval().requires_grad_(False), deltas


@torch.no_grad()
def sync_deltas(model: nn.Module, deltas: dict[str, DeltaLinear], full: Callable[[Tensor], Tensor]) -> None:
    """Write the policy's current factors into the copy's :class:`DeltaLinear` layers (``full`` gathers a
    sharded tensor). The base weights are frozen under LoRA: they were copied once, with the copy."""
    for name, delta in deltas.items():
        layer = model.get_submodule(name)
        adapter = adapter_of(layer)
        delta.set_delta(full(layer.lora_A[adapter].weight), full(layer.lora_B[adapter].weight),
                        float(layer.scaling[adapter]))
