"""LoRA utilities: wrapping a model, recognising adapted layers, and the weights they apply.

Every "is this a LoRA layer?" question in opsd is :func:`is_lora_layer`; every merge (the sampler's
copy, the EMA teacher) goes through :func:`iter_effective_weights`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from opsd_core.config import ConfigError, LoraConfig

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


def wrap_lora(model: PreTrainedModel, cfg: LoraConfig) -> PeftModel:
    """Wrap ``model`` with a fresh LoRA adapter on the configured projections that exist in it."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType, get_peft_model

    linear_names = {
        name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)
    }
    head = model.get_output_embeddings()
    head_names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if mod is head}
    if head_names & set(cfg.target_modules):
        # the chunked loss projects with the head's base weight, so a head adapter would never get a gradient
        raise ConfigError(f"lora.target_modules: {sorted(head_names & set(cfg.target_modules))[0]} is the output head, "
                          "which OPSD's loss reads without an adapter; remove it (or set lora.enabled: false to "
                          "train every weight)")
    present = [m for m in cfg.target_modules if m in linear_names]
    missing = [m for m in cfg.target_modules if m not in linear_names]
    if not present:
        raise ConfigError(
            f"lora.target_modules {missing} match no linear layer of the model; "
            f"available: {sorted(linear_names)}"
        )
    if missing:
        log.warning("lora.target_modules not in the model, skipped: %s", missing)
    peft_cfg = PeftLoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=present,
    )
    return get_peft_model(model, peft_cfg)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (LoRA layers stay injected in place)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def is_peft(model: nn.Module) -> bool:
    return callable(getattr(model, "disable_adapter", None)) and hasattr(model, "peft_config")


def is_lora_layer(module: nn.Module) -> bool:
    """A peft LoRA wrapper around a frozen base layer: the one test every part of opsd uses."""
    return hasattr(module, "base_layer") and hasattr(module, "lora_A")


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's LoRA-wrapped layers by module name."""
    return {name: m for name, m in model.named_modules() if is_lora_layer(m)}


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
    for name, layer in lora_layers(model).items():
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


def plain_lora(layer: nn.Module, adapter: str) -> bool:
    """A standard LoRA linear for ``adapter``: delta = scale·B·A on an nn.Linear base, no DoRA or other
    variant, no fan-in/fan-out transpose (the sampler's and the EMA teacher's fused merge rely on it too)."""
    return (isinstance(layer.base_layer, nn.Linear) and not getattr(layer, "fan_in_fan_out", False)
            and adapter not in getattr(layer, "lora_variant", {})
            and not getattr(layer, "use_dora", {}).get(adapter, False))


def plain_adapter(layer: nn.Module) -> str | None:
    """The one active vanilla adapter of a peft LoRA linear this path can run, else None."""
    if layer.disable_adapters or layer.merged:
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1 or not plain_lora(layer, active[0]):
        return None
    name = active[0]
    if not isinstance(layer.lora_dropout[name], nn.Identity) or layer.lora_B[name].bias is not None:
        return None
    return name
