"""The execution back-end interface: how the trainer's passes run, apart from what they compute.

The OPSD loop asks a back-end three things: the module to sample rollouts from (carrying the policy's
current weights), the context the student's gradient pass runs in, and, for a teacher's no-gradient
pass over frozen weights, an engine that scores one unpadded row at a time (or None: the padded batch
through the model). :class:`Backend` is the portable answer (any device, transformers' passes, the
sampler's merged copy); :class:`~opsd_core.backends.cpu.CpuBackend` adds the CPU speed-ups. A new
back-end (a compiled GPU one) subclasses :class:`Backend` and is chosen in ``opsd_core.stages.train``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from opsd_core.backends.engine import DecoderEngine
from opsd_core.backends.packs import LinearPacks
from opsd_core.backends.sampler import PolicySampler


class Backend:
    """Portable passes: rollouts from a :class:`PolicySampler`, student and teachers through the model."""

    name = "torch"

    def __init__(self, model: nn.Module, sampling_dtype: torch.dtype, sampler: str = "engine",
                 log: Callable[[str], None] = lambda _msg: None, sampler_packs: LinearPacks | None = None,
                 full_copy: bool = False) -> None:
        """``sampler``: the plan's sampler (engine, generate or static); ``sampler_packs``: oneDNN packs
        for the sampler copy's frozen linears (CPU only); ``full_copy``: sample from a whole copy even when
        the policy itself would do (made before ``model`` is sharded, see :class:`PolicySampler`)."""
        self.sampler = PolicySampler(model, sampling_dtype, sampler, log, sampler_packs, full_copy)

    #: packs of the frozen base weights shared by the student's pass and the fixed teacher (CPU only)
    packs: LinearPacks | None = None

    def sampling_module(self) -> nn.Module | DecoderEngine:
        """The engine or module to sample from, synchronised with the policy's current weights."""
        return self.sampler.module()

    @property
    def generate_options(self) -> dict[str, object]:
        """Extra options for transformers ``generate`` when the sampler uses it (the static cache)."""
        return self.sampler.generate_options

    def student_pass(self, model: nn.Module) -> AbstractContextManager[None]:
        """The context the student's forward and backward run in."""
        return nullcontext()

    def scoring_engine(self, module: nn.Module, shared_packs: bool = False) -> DecoderEngine | None:
        """An engine scoring ``module``'s base weights one unpadded row at a time (LoRA adapters ignored),
        or None for the padded batch through the model. ``shared_packs``: the weights never change, so
        the engine may use :attr:`packs`."""
        return None

    def describe_sampler(self) -> str:
        engine = "opsd engine" if self.sampler.engine is not None else "transformers generate" + (
            ", static cache" if self.generate_options.get("cache_implementation") == "static" else "")
        copy = self.sampler.copy
        if copy is None:
            return engine + " on the policy"
        dtype = str(next(copy.parameters()).dtype).removeprefix("torch.")
        if self.sampler.deltas:
            return engine + f" on a {dtype} copy, LoRA delta unmerged"
        return engine + f" on a merged {dtype} copy"
