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

from opsd_core.algorithm.scoring import ScoringBatch, completion_hidden, engine_completion_hidden, lm_head
from opsd_core.backends.base import Backend
from opsd_core.backends.engine import DecoderEngine
from opsd_core.config import ConfigError
from opsd_core.models.lora import effective_weights, is_peft, iter_effective_weights, lora_layers

TeacherMode = Literal["fixed", "ema", "live"]


class Teacher(Protocol):
    def hidden(self, batch: ScoringBatch) -> Tensor: ...
    def lm_head_weight(self) -> Tensor: ...
    def update(self) -> None: ...
    def state_dict(self) -> dict[str, Tensor]: ...
    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...
    def describe(self) -> str: ...


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
    ignored, so no copy is needed for LoRA in the training dtype), when ``backend`` offers that engine;
    its frozen linears may share the back-end's packs with the student's pass over the same base layers.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None, backend: Backend | None = None) -> None:
        super().__init__(model)
        self._frozen: nn.Module | None = None
        if dtype is not None and dtype != next(model.parameters()).dtype:
            frozen = copy.deepcopy(model)
            frozen = frozen.unload() if is_peft(frozen) else frozen
            self._frozen = frozen.to(dtype).eval().requires_grad_(False)
        elif not is_peft(model):
            self._frozen = copy.deepcopy(model).eval().requires_grad_(False)
        if backend is not None:
            self._engine = backend.scoring_engine(self._frozen if self._frozen is not None else model,
                                                  shared_packs=True)

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

    def __init__(self, model: nn.Module, decay: float, backend: Backend | None = None) -> None:
        super().__init__(model)
        self.decay = decay
        self.lora = is_peft(model)
        # fp32 accumulators: a 1 % update of a bf16 weight is often below bf16's resolution
        self.ema = {name: w.detach().float().clone() for name, w in effective_weights(self.model).items()}
        # the engine reads the module's weight tensors at call time, so it sees the EMA swapped in
        if backend is not None:
            self._engine = backend.scoring_engine(model)

    def _targets(self) -> dict[str, Tensor]:
        """name -> the parameter tensor the EMA replaces during a teacher pass."""
        if self.lora:
            return {n: m.base_layer.weight for n, m in lora_layers(self.model).items()}
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
    backend: Backend | None = None,
) -> Teacher:
    """The teacher ``opsd.teacher`` names; ``backend`` decides how its pass runs (None: padded batches)."""
    if mode == "fixed":
        return FixedTeacher(model, dtype, backend)
    if mode == "live":
        return LiveTeacher(model)
    if mode == "ema":
        return EmaTeacher(model, ema_decay, backend)
    raise ConfigError(f"opsd.teacher: unknown mode {mode!r} (fixed, ema, live)")
