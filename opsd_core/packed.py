"""Frozen linear layers on CPU through oneDNN with pre-packed weights.

On a CPU, ``F.linear`` goes to the BLAS library torch was built with (MKL). oneDNN's inner product
with the weight reordered once into its blocked layout is faster for the shapes a training step
runs, and much faster for decoding's few-row products: on the 2-core AMD EPYC this project is
measured on, 2.1x at 2048³ fp32 (MKL takes a slow path on non-Intel CPUs), 1.6-1.9x for SmolLM2's
fp32 layers at 250-360 rows, 1.5-2.2x for bf16 decoding at 1-4 rows (``benchmarks/``). The
reorder costs a few milliseconds per matrix and a copy of the weight, so it pays only for weights
that do not change between calls: a LoRA model's frozen base (the student's forward, the fixed
teacher) and the sampler's merged copy (repacked once per step).

Results are not bit-identical to ``F.linear`` in fp32 (another summation order: relative
differences around 1e-6); bf16 products matched exactly in the measurements.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# below this many weight elements the per-call overhead of the oneDNN primitive (~10 us) costs more
# than the faster product saves (measured: 64x128 slower packed, 576x576 and up faster)
MIN_ELEMENTS = 1 << 17
DTYPES = (torch.float32, torch.bfloat16)
_probe: bool | None = None


def available(device: torch.device | str) -> bool:
    """True on a CPU whose torch build runs oneDNN's packed inner product (probed once)."""
    global _probe
    if torch.device(device).type != "cpu":
        return False
    if _probe is None:
        try:
            w = torch.randn(8, 4)
            packed = torch.ops.mkldnn._reorder_linear_weight(w)
            x = torch.randn(3, 4)
            out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
            _probe = bool(torch.allclose(out, x @ w.t(), atol=1e-5))
        except (AttributeError, RuntimeError):
            _probe = False
    return _probe


def _pack(weight: Tensor) -> Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def _apply(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


class PackedLinear:
    """``y = x Wᵀ + b`` for a frozen ``W`` [out, in], packed for oneDNN; gradients flow to ``x`` only.

    The input gradient ``g W`` is a plain matmul on ``W``: a second pack of ``Wᵀ`` (one more copy)
    measured no faster in the student's backward (2.79 vs 2.87 s, within noise). Inputs in another
    dtype than ``W`` fall back to ``F.linear``. The source tensor's identity is kept, so
    :meth:`matches` can tell a stale pack.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.source = _identity(weight)
        self.forward_pack = _pack(self.weight)

    def matches(self, weight: Tensor) -> bool:
        return _identity(weight) == self.source

    def __call__(self, x: Tensor) -> Tensor:
        if x.dtype != self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        if torch.is_grad_enabled() and x.requires_grad:
            return _PackedLinearFn.apply(x, self)
        return _apply(x, self.forward_pack, self.bias)

    def forward_no_grad(self, x: Tensor) -> Tensor:
        """``x Wᵀ + b`` outside autograd (for callers that write their own backward)."""
        return _apply(x, self.forward_pack, self.bias)

    def input_grad(self, grad: Tensor) -> Tensor:
        """``grad W``: the gradient of the input given the output's."""
        return grad @ self.weight


class _PackedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: PackedLinear) -> Tensor:
        ctx.layer = layer
        return _apply(x, layer.forward_pack, layer.bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return ctx.layer.input_grad(grad), None


def _identity(t: Tensor) -> tuple[int, int, tuple[int, ...], torch.dtype]:
    # storage address + in-place version: a swapped-in (``.data = ...``) or in-place modified weight reads as new
    return (t.data_ptr(), t._version, tuple(t.shape), t.dtype)


def wanted(linear: nn.Module, force: bool = False) -> bool:
    """Whether ``linear`` is a frozen nn.Linear worth packing (any size with ``force``)."""
    if type(linear) is not nn.Linear or linear.weight.requires_grad or linear.weight.dtype not in DTYPES:
        return False
    if linear.bias is not None and linear.bias.requires_grad:
        return False
    return _big_enough(linear.weight, force)


def _big_enough(weight: Tensor, force: bool) -> bool:
    return force or weight.numel() >= MIN_ELEMENTS


class LinearPacks:
    """Packed copies of a model's frozen linears, built on first use and kept while their weights stay.

    One instance serves every pass over the same frozen weights (the student's base layers, the
    fixed teacher reading the same base), so each weight is packed once per run, not per step.
    ``force`` packs layers of any size (tests run the path on tiny models).
    """

    def __init__(self, force: bool = False) -> None:
        self.force = force
        self._packs: dict[int, PackedLinear] = {}

    def get(self, linear: nn.Module) -> PackedLinear | None:
        """The pack of ``linear`` (rebuilt when its weight changed), or None when it is not packed."""
        if not wanted(linear, self.force):
            return None
        pack = self._packs.get(id(linear))
        if pack is None or not pack.matches(linear.weight):
            pack = PackedLinear(linear.weight, linear.bias)
            self._packs[id(linear)] = pack
        return pack

    def pack(self, weight: Tensor, bias: Tensor | None) -> PackedLinear | None:
        """A new pack of a matrix this instance does not track (the engine's concatenated q/k/v, gate/up),
        or None when it is too small to gain."""
        return PackedLinear(weight, bias) if _big_enough(weight, self.force) else None


def from_setting(setting: str, device: torch.device | str) -> LinearPacks | None:
    """``train.packed_weights`` (auto | on | off) on ``device`` → the packs to use, or None."""
    if setting == "off":
        return None
    if not available(device):
        if setting == "on":
            raise ValueError(f"train.packed_weights=on needs a CPU torch build with oneDNN (device is {device})")
        return None
    return LinearPacks(force=setting == "on")
