"""Which module rollouts are generated with: the policy, or a copy of it (engine or ``generate``)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from opsd_core.backends.delta_linear import DeltaLinear, sync_deltas, unmergeable, unmerged_copy
from opsd_core.backends.engine import DecoderEngine, supports
from opsd_core.backends.fsdp import full
from opsd_core.backends.packs import LinearPacks
from opsd_core.models.lora import is_peft, iter_effective_weights


class PolicySampler:
    """What rollouts are sampled from: the policy itself, or a copy of it.

    The copy may use another dtype (decoding is memory-bound, so bf16 roughly halves the bytes read per
    token) and is refreshed from the policy before every rollout, so rollouts stay on-policy up to the
    sampling dtype's rounding (as with any bf16 inference engine beside an fp32 trainer). In fp32 (or
    wider) the copy has LoRA folded in (no adapter products in the decode loop). In bf16 or fp16 a LoRA
    policy's delta stays unmerged (:class:`~opsd_core.backends.delta_linear.DeltaLinear`: the low-rank
    product summed into the base product before its one rounding), on every path: a merged bf16 copy
    rounds an early, small delta away and samples the base model instead of the policy.

    ``backend="engine"`` always makes the copy and decodes it with :class:`DecoderEngine` when the
    architecture is supported (``packs``: its frozen linears through oneDNN on a CPU); otherwise (or with
    ``"generate"``) transformers ``generate`` runs on the copy when the dtype differs, else on the policy
    itself. ``"static"`` always makes the copy and decodes it with ``generate`` over transformers' static
    KV cache, which transformers compiles on a GPU; prompts are left-padded to a multiple of
    :data:`PROMPT_BUCKET` tokens so the cache's shapes, and so the compiled graphs, repeat across steps.

    ``full_copy``: always decode a copy, for a policy that will be sharded (FSDP2): each rank samples its
    own rows, a different number of tokens, so it cannot decode through a module whose every forward is a
    collective of all ranks; ``sync`` gathers the shards into the copy (every rank calls it, each step).
    """

    PROMPT_BUCKET = 64

    _PEFT_PREFIX = "base_model.model."

    def __init__(self, model: nn.Module, dtype: torch.dtype, backend: str = "engine",
                 log: Callable[[str], None] = lambda _msg: None, packs: LinearPacks | None = None,
                 full_copy: bool = False) -> None:
        self.model = model
        self.copy: nn.Module | None = None
        self.engine: DecoderEngine | None = None
        self.lora = is_peft(model)
        #: the copy's unmerged LoRA layers by the policy's layer name (low-precision copies of a LoRA policy)
        self.deltas: dict[str, DeltaLinear] = {}
        unmerged = self.lora and dtype in (torch.bfloat16, torch.float16) and unmergeable(model)
        if self.lora and dtype in (torch.bfloat16, torch.float16) and not unmerged:
            log(f"sampling: LoRA layers the {dtype} copy cannot keep unmerged (DoRA, several adapters, ...): "
                "merged, so a delta below the dtype's resolution is lost")
        self.generate_options: dict[str, object] = {}
        if backend == "static":
            self.generate_options = {"cache_implementation": "static", "pad_prompts_to": self.PROMPT_BUCKET}
        use_engine = backend == "engine"
        if use_engine:
            reason = supports(model)
            if reason is not None:
                log(f"sampling: engine unavailable ({reason}); using transformers generate")
                use_engine = False
        # an unmerged delta needs the copy even in the policy's dtype: peft's own forward rounds it away too
        if (not use_engine and backend != "static" and not full_copy and not unmerged
                and dtype == next(model.parameters()).dtype):
            return
        if unmerged:
            self.copy, self.deltas = unmerged_copy(model, dtype)
        else:
            plain = copy.deepcopy(model)
            if self.lora:
                plain = plain.merge_and_unload()
            self.copy = plain.to(dtype).eval().requires_grad_(False)
        if use_engine:
            self.engine = DecoderEngine(self.copy, packs=packs)

    @torch.no_grad()
    def sync(self) -> None:
        if self.copy is None:
            return
        if self.deltas:
            sync_deltas(self.model, self.deltas, full)
            return  # no engine refresh: unmerged layers are never fused or packed (engine._Proj)
        for name, weight in iter_effective_weights(self.model):
            if self.lora:
                target = self.copy.get_submodule(name.removeprefix(self._PEFT_PREFIX)).weight
            else:
                target = self.copy.get_parameter(name)
            target.copy_(full(weight))  # in place: the engine's packed matrices are this storage
        if self.engine is not None:
            self.engine.refresh()

    def module(self) -> nn.Module | DecoderEngine:
        """The up-to-date engine or module to sample from."""
        self.sync()
        if self.engine is not None:
            return self.engine
        return self.copy if self.copy is not None else self.model

