"""The CPU back-end: oneDNN weight packs, the fused LoRA linear, and per-row scoring.

On a CPU the FLOPs are the cost, so teachers are scored by :class:`DecoderEngine` one unpadded row at
a time (no compute spent on padding), and frozen linears run through oneDNN's packed weights. On a GPU
each row would be another few hundred small kernel launches and the padded batch is the better trade
(opsd's scoring measured 0.46x TRL's with the per-row engine on an H200, SmolLM2-135M, 8 rows a
micro-batch: benchmarks/results/2026-11-27-h200.md), so :class:`~opsd_core.backends.base.Backend`
keeps the padded batch.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from opsd_core.backends.base import Backend
from opsd_core.backends.engine import DecoderEngine, supports
from opsd_core.backends.fused_lora import installed
from opsd_core.backends.packs import LinearPacks


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self, model: nn.Module, sampling_dtype: torch.dtype, sampler: str = "engine",
                 log: Callable[[str], None] = lambda _msg: None, packs: LinearPacks | None = None,
                 sampler_packs: LinearPacks | None = None, full_copy: bool = False) -> None:
        """``packs``: for the frozen base weights in the training dtype (None: plain ``F.linear``);
        ``sampler_packs``: for the sampler's copy, whose dtype is its own; ``full_copy``: see :class:`Backend`."""
        super().__init__(model, sampling_dtype, sampler, log, sampler_packs, full_copy)
        self.packs = packs

    def student_pass(self, model: nn.Module) -> AbstractContextManager[None]:
        return installed(model, self.packs) if self.packs is not None else nullcontext()

    def scoring_engine(self, module: nn.Module, shared_packs: bool = False) -> DecoderEngine | None:
        if supports(module) is not None:
            return None
        return DecoderEngine(module, fuse=False, packs=self.packs if shared_packs else None)
