"""Which module rollouts are generated with (the policy, or a merged copy in the sampling dtype)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from opsd_core.teacher import is_peft, iter_effective_weights


class PolicySampler:
    """The module rollouts are generated with: the policy itself, or a merged copy in another dtype.

    Decoding is memory-bound, so sampling in bf16 while training in fp32 roughly halves the bytes
    read per token. The copy has LoRA folded in (no adapter matmuls in the decode loop) and is
    refreshed from the policy's effective weights before every rollout, so rollouts stay on-policy
    up to the sampling dtype's rounding (as with any bf16 inference engine beside an fp32 trainer).
    """

    _PEFT_PREFIX = "base_model.model."

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        self.model = model
        self.copy: nn.Module | None = None
        if dtype == next(model.parameters()).dtype:
            return
        self.lora = is_peft(model)
        plain = copy.deepcopy(model)
        if self.lora:
            plain = plain.merge_and_unload()
        self.copy = plain.to(dtype).eval().requires_grad_(False)

    @torch.no_grad()
    def sync(self) -> None:
        if self.copy is None:
            return
        for name, weight in iter_effective_weights(self.model):
            if self.lora:
                target = self.copy.get_submodule(name.removeprefix(self._PEFT_PREFIX)).weight
            else:
                target = self.copy.get_parameter(name)
            target.copy_(weight)

    def module(self) -> nn.Module:
        """The up-to-date module to call ``generate`` on."""
        self.sync()
        return self.copy if self.copy is not None else self.model
