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

A pack may also compute in a narrower dtype than its weight (``compute=torch.bfloat16`` over fp32
weights): the weight is rounded to bf16 once, inputs are rounded on the way in and outputs returned
in the input's dtype, as ``torch.autocast`` does for a linear layer. On CPUs with bf16 units
(AVX512-BF16, AMX) oneDNN runs such products 2-3x faster than fp32 (``benchmarks/``).

Whether packs are used at all, and which dtypes oneDNN may pack, is the run's plan
(:mod:`opsd_core.backends.plan`, from :mod:`opsd_core.backends.capabilities`): oneDNN refuses bf16 weights on CPUs
without AVX-512 BW/VL/DQ or AVX-NE-CONVERT, so there :class:`LinearPacks` leaves them to ``F.linear``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from opsd_core.backends.capabilities import CapabilityError
from opsd_core.backends.plan import ExecutionPlan

# below this many weight elements the per-call overhead of the oneDNN primitive (~10 us) costs more
# than the faster product saves (measured: 64x128 slower packed, 576x576 and up faster)
MIN_ELEMENTS = 1 << 17


def _pack(weight: Tensor) -> Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def _apply(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


class PackedLinear:
    """``y = x Wᵀ + b`` for a frozen ``W`` [out, in], packed for oneDNN; gradients flow to ``x`` only.

    ``compute``: the dtype the products run in (default ``W``'s own); inputs in ``W``'s dtype are
    rounded to it and results come back in ``W``'s dtype. The input gradient ``g W`` is a plain
    matmul on ``W`` (in ``compute``): a second pack of ``Wᵀ`` (one more copy) measured no faster in
    the student's backward (2.79 vs 2.87 s, and 3.69 vs 3.72 s in a later alternating run). Inputs in
    another dtype than ``W`` fall back to ``F.linear``. The source tensor's identity is kept, so
    :meth:`matches` can tell a stale pack.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None, compute: torch.dtype | None = None) -> None:
        self.weight = weight.detach()
        self.source = _identity(weight)
        self.compute = compute or self.weight.dtype
        # the operands in the compute dtype (the weight itself when that is its own dtype)
        self.matrix = self.weight.to(self.compute)
        self.bias = None if bias is None else bias.detach()
        self._bias = None if bias is None else self.bias.to(self.compute)
        self.forward_pack = _pack(self.matrix)

    def matches(self, weight: Tensor) -> bool:
        return _identity(weight) == self.source

    def __call__(self, x: Tensor) -> Tensor:
        if x.dtype != self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        if torch.is_grad_enabled() and x.requires_grad:
            return _PackedLinearFn.apply(x, self)
        return self.forward_no_grad(x)

    def forward_no_grad(self, x: Tensor) -> Tensor:
        """``x Wᵀ + b`` outside autograd (for callers that write their own backward), in ``x``'s dtype."""
        return _apply(x.to(self.compute), self.forward_pack, self._bias).to(x.dtype)

    def input_grad(self, grad: Tensor) -> Tensor:
        """``grad W``: the gradient of the input given the output's (in ``grad``'s dtype)."""
        return (grad.to(self.compute) @ self.matrix).to(grad.dtype)


class _PackedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: PackedLinear) -> Tensor:
        ctx.layer = layer
        return layer.forward_no_grad(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return ctx.layer.input_grad(grad), None


def _identity(t: Tensor) -> tuple[int, int, tuple[int, ...], torch.dtype]:
    # storage address + in-place version: a swapped-in (``.data = ...``) or in-place modified weight reads as new
    return (t.data_ptr(), t._version, tuple(t.shape), t.dtype)


def wanted(linear: nn.Module, force: bool = False, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> bool:
    """Whether ``linear`` is a frozen nn.Linear worth packing (any size with ``force``) in one of ``dtypes``."""
    if type(linear) is not nn.Linear or linear.weight.requires_grad or linear.weight.dtype not in dtypes:
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
    ``force`` packs layers of any size (tests run the path on tiny models); ``compute``: the dtype
    the products run in (``None``: each weight's own). With ``compute``, layers of every size are
    packed, so that every product with a frozen weight runs in that dtype, as the setting says.
    ``dtypes``: the weight dtypes this machine's oneDNN can pack (bf16 needs AVX-512 BW/VL/DQ or
    AVX-NE-CONVERT: :mod:`opsd_core.backends.capabilities`); weights in other dtypes keep ``F.linear``.
    """

    def __init__(self, force: bool = False, compute: torch.dtype | None = None,
                 dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> None:
        if compute is not None and compute not in dtypes:
            raise CapabilityError(f"LinearPacks: compute dtype {compute} is not packable here (packable: {dtypes})")
        self.force = force
        self.compute = compute
        self.dtypes = dtypes
        self._packs: dict[int, PackedLinear] = {}

    def wants(self, linear: nn.Module) -> bool:
        """Whether ``linear`` runs through a pack of this instance."""
        return wanted(linear, self.every_size, self.dtypes)

    @property
    def every_size(self) -> bool:
        return self.force or self.compute is not None

    def clear(self) -> None:
        """Drop every pack made so far (the next use rebuilds them, e.g. after ``compute`` changed)."""
        self._packs.clear()

    def get(self, linear: nn.Module) -> PackedLinear | None:
        """The pack of ``linear`` (rebuilt when its weight changed), or None when it is not packed."""
        if not self.wants(linear):
            return None
        pack = self._packs.get(id(linear))
        if pack is None or not pack.matches(linear.weight):
            pack = PackedLinear(linear.weight, linear.bias, self.compute)
            self._packs[id(linear)] = pack
        return pack

    def pack(self, weight: Tensor, bias: Tensor | None) -> PackedLinear | None:
        """A new pack of a matrix this instance does not track (the engine's concatenated q/k/v, gate/up),
        or None when it is too small to gain or its dtype cannot be packed here."""
        if weight.dtype not in self.dtypes or not _big_enough(weight, self.every_size):
            return None
        return PackedLinear(weight, bias, self.compute)


def for_plan(plan: ExecutionPlan, frozen_dtype: bool = True) -> LinearPacks | None:
    """The packs a run uses (None when the plan has them off). ``frozen_dtype``: with the plan's
    ``train.frozen_dtype`` as the compute dtype (the student's pass and the fixed teacher); without it
    for a copy whose dtype is its own choice (the sampler's)."""
    if plan.packs == "off":
        return None
    compute = getattr(torch, plan.frozen_dtype) if frozen_dtype and plan.frozen_dtype else None
    return LinearPacks(force=plan.packs == "all", compute=compute,
                       dtypes=tuple(getattr(torch, d) for d in plan.pack_dtypes))
