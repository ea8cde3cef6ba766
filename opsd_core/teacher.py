"""Teachers behind one interface: ``fixed``, ``ema`` and ``live`` (DESIGN.md section 5.3).

A teacher produces completion hidden states without gradient, plus the lm-head weight that turns
them into logits. With LoRA, ``fixed`` is the same module with its adapter disabled (one copy of
the weights); with full fine-tuning it is a frozen copy. ``ema`` keeps an exponential moving
average of the *effective* weights of the trained modules (for LoRA: W0 + scale·B·A, the merged
delta, not separate averages of A and B, whose product would not be the average delta).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from opsd_core.engine import DecoderEngine, supports
from opsd_core.lora_pass import plain_lora
from opsd_core.packed import LinearPacks
from opsd_core.scoring import ScoringBatch, completion_hidden, engine_completion_hidden, lm_head

TeacherMode = Literal["fixed", "ema", "live"]


class Teacher(Protocol):
    def hidden(self, batch: ScoringBatch) -> Tensor: ...
    def lm_head_weight(self) -> Tensor: ...
    def update(self) -> None: ...
    def state_dict(self) -> dict[str, Tensor]: ...
    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...
    def describe(self) -> str: ...


def is_peft(model: nn.Module) -> bool:
    return callable(getattr(model, "disable_adapter", None)) and hasattr(model, "peft_config")


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """LoRA-wrapped linear layers by name (modules with a ``base_layer`` and ``lora_A``)."""
    return {
        name: m for name, m in model.named_modules()
        if hasattr(m, "base_layer") and hasattr(m, "lora_A") and hasattr(m, "get_delta_weight")
    }


def iter_effective_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The weights the trained modules currently apply, by name, one at a time.

    LoRA: for each adapted linear layer (module name) W0 + scale·B·A, computed in fp32 whatever the
    base dtype (a caller rounds once, when it stores the result: a bf16 merge would add a delta of
    rms 4e-5 to weights of rms 2e-2 with ~60 % relative error, as the first steps of a bf16 run have);
    full fine-tuning: every trainable parameter (parameter name), as it is. Detached. A generator, so a
    caller that copies each tensor away holds one merged layer at a time, not a second copy of the model.
    """
    if not is_peft(model):
        for n, p in model.named_parameters():
            if p.requires_grad:
                yield n, p.detach()
        return
    for name, layer in _lora_layers(model).items():
        weight = layer.base_layer.weight
        acc = torch.promote_types(weight.dtype, torch.float32)
        active = [a for a in layer.active_adapters if a in layer.lora_A]
        if len(active) == 1 and plain_lora(layer, active[0]):
            a = active[0]
            with torch.no_grad():  # one fused pass: W0 + s·(B @ A), no zero tensor, no separate delta
                yield name, torch.addmm(weight.to(acc), layer.lora_B[a].weight.to(acc), layer.lora_A[a].weight.to(acc),
                                        alpha=layer.scaling[a])
            continue
        with torch.no_grad():
            delta = sum((layer.get_delta_weight(a).to(acc) for a in active), start=torch.zeros_like(weight, dtype=acc))
            yield name, weight.detach().to(acc) + delta


def effective_weights(model: nn.Module) -> dict[str, Tensor]:
    """:func:`iter_effective_weights` as a dict (holds all merged layers at once)."""
    return dict(iter_effective_weights(model))


def _engine(module: nn.Module, packs: LinearPacks | None = None, per_row: bool | None = None) -> DecoderEngine | None:
    """An unpacked engine over ``module``'s weights (LoRA adapters ignored), if the architecture allows.

    ``per_row`` None: on a CPU only. The engine scores one unpadded row at a time, which saves the
    padding's FLOPs where FLOPs are the cost; on a GPU every row is another few hundred small kernel
    launches, and the padded batch is the better trade (opsd's scoring measured 0.46x TRL's with the
    per-row engine on an H200, SmolLM2-135M, 8 rows a micro-batch: benchmarks/results/2026-11-27-h200.md).
    """
    if per_row is None:
        per_row = next(module.parameters()).device.type == "cpu"
    return DecoderEngine(module, pack=False, packs=packs) if per_row and supports(module) is None else None


class _TeacherBase:
    # set by teachers whose pass ignores the adapter: scored by the engine, one unpadded row at a time
    _engine: DecoderEngine | None = None

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @contextmanager
    def _weights(self) -> Iterator[nn.Module]:
        yield self.model

    @torch.no_grad()
    def hidden(self, batch: ScoringBatch) -> Tensor:
        with self._weights() as module:
            if self._engine is not None:
                return engine_completion_hidden(self._engine, batch)
            was_training = module.training
            module.eval()
            try:
                return completion_hidden(module, batch).detach()
            finally:
                module.train(was_training)

    def describe(self) -> str:
        """How the teacher's pass runs (for the run's execution record)."""
        if self._engine is not None:
            return f"opsd engine, one unpadded row at a time, {self._engine.dtype}".replace("torch.", "")
        return "padded batch through the model"

    def lm_head_weight(self) -> Tensor:
        with self._weights() as module:
            return lm_head(module).weight.detach()

    def update(self) -> None:
        """Called after each optimizer step."""

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got {len(state)} tensors")


class LiveTeacher(_TeacherBase):
    """The current weights under stop-gradient."""


class FixedTeacher(_TeacherBase):
    """The initial policy: adapter disabled (LoRA) or a frozen copy (full fine-tuning).

    With ``dtype`` different from the weights' dtype, a frozen copy of the base in that dtype is
    scored instead (LoRA removed): one more copy of the weights, bf16 trades teacher precision for
    speed. On a CPU, Llama-family models are scored by :class:`DecoderEngine` (no padding, adapter
    ignored, so no copy is needed for LoRA in the training dtype; ``per_row`` overrides the choice);
    ``packs`` runs its frozen linears through oneDNN there (shared with the student's pass over the
    same base layers).
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None, packs: LinearPacks | None = None,
                 per_row: bool | None = None) -> None:
        super().__init__(model)
        self._frozen: nn.Module | None = None
        if dtype is not None and dtype != next(model.parameters()).dtype:
            frozen = copy.deepcopy(model)
            frozen = frozen.unload() if is_peft(frozen) else frozen
            self._frozen = frozen.to(dtype).eval().requires_grad_(False)
        elif not is_peft(model):
            self._frozen = copy.deepcopy(model).eval().requires_grad_(False)
        self._engine = _engine(self._frozen if self._frozen is not None else model, packs, per_row)

    @contextmanager
    def _weights(self) -> Iterator[nn.Module]:
        if self._frozen is not None:
            yield self._frozen
        elif self._engine is not None:  # the engine reads the base layers: no adapter to switch off
            yield self.model
        else:
            with self.model.disable_adapter():
                yield self.model


class EmaTeacher(_TeacherBase):
    """Exponential moving average of the effective trained weights, swapped in for teacher passes."""

    def __init__(self, model: nn.Module, decay: float, per_row: bool | None = None) -> None:
        super().__init__(model)
        self.decay = decay
        self.lora = is_peft(model)
        # fp32 accumulators: a 1 % update of a bf16 weight is often below bf16's resolution
        self.ema = {name: w.detach().float().clone() for name, w in effective_weights(self.model).items()}
        # the engine reads the module's weight tensors at call time, so it sees the EMA swapped in
        self._engine = _engine(model, per_row=per_row)

    def _targets(self) -> dict[str, Tensor]:
        """name -> the parameter tensor the EMA replaces during a teacher pass."""
        if self.lora:
            return {n: m.base_layer.weight for n, m in _lora_layers(self.model).items()}
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self) -> None:
        for name, w in iter_effective_weights(self.model):
            self.ema[name].mul_(self.decay).add_(w.float(), alpha=1.0 - self.decay)

    @contextmanager
    def _weights(self) -> Iterator[nn.Module]:
        targets = self._targets()
        saved = {n: t.data for n, t in targets.items()}
        ctx = self.model.disable_adapter() if self.lora else nullcontext()
        with ctx:
            try:
                for n, t in targets.items():
                    t.data = self.ema[n].to(t.dtype)  # no copy when the weights are fp32
                yield self.model
            finally:
                for n, t in targets.items():
                    t.data = saved[n]

    def state_dict(self) -> dict[str, Tensor]:
        return {n: t.clone() for n, t in self.ema.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if set(state) != set(self.ema):
            missing = sorted(set(self.ema) - set(state))[:3]
            raise ValueError(f"EMA state does not match the model (missing e.g. {missing})")
        for n, t in state.items():
            self.ema[n].copy_(t)


def make_teacher(
    mode: TeacherMode, model: nn.Module, ema_decay: float = 0.99, dtype: torch.dtype | None = None,
    packs: LinearPacks | None = None,
) -> Teacher:
    """``packs`` (oneDNN on CPU) is used by the fixed teacher only: the others' weights change every step."""
    if mode == "fixed":
        return FixedTeacher(model, dtype, packs)
    if mode == "live":
        return LiveTeacher(model)
    if mode == "ema":
        return EmaTeacher(model, ema_decay)
    raise ValueError(f"opsd.teacher: unknown mode {mode!r} (fixed, ema, live)")
