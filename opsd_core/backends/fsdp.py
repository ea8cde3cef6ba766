"""Full fine-tuning on several ranks with FSDP2: each rank holds 1/N of every weight, gradient and AdamW state.

Replicating a full fine-tuning (DDP) keeps the whole model, its gradients and two fp32 AdamW moments on
every rank: 16 bytes a parameter in fp32, 27 GB for a 1.7B model before any activation. ``fully_shard`` (per
decoder layer, then the root for the embeddings, the final norm and the tied head) keeps 1/N of each and
all-gathers a layer's weights just for its forward and backward.

The trainer's arithmetic stays the one of :mod:`opsd_core.backends.distributed`: the loss of each rank is
already divided by the step's *global* token count, so the ranks' gradients must be **summed**, not
averaged (FSDP2's default). :func:`shard` sets the divide factor to 1 with sum-only collectives (gloo has
no pre-multiplied sum). Whatever needs whole weights (the sampler's copy, checkpoints, the candidate) gets
them from :func:`full`, and a checkpoint holds whole tensors, so a run resumes with any world size.

The loss reads the head's weight directly (it never calls the head), and the student's pass calls the
decoder, not the model: :func:`decoder_call` runs the decoder through the root's FSDP hooks, which gather
the root's weights (kept gathered until the backward, ``reshard_after_forward=False``) and reduce-scatter
their gradients after it.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

from opsd_core.models.lora import unwrap

# the method of a sharded root that runs its decoder under the root's FSDP hooks (see decoder_call)
_DECODER_METHOD = "opsd_decoder_hidden"


def _decoder_hidden(self: nn.Module, **kwargs: Any) -> Tensor:
    """The decoder's last hidden states (a plain tensor: FSDP hooks the output's backward)."""
    return unwrap(self).get_decoder()(**kwargs).last_hidden_state


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder's transformer blocks, each one FSDP unit."""
    layers = getattr(unwrap(model).get_decoder(), "layers", None)
    if layers is None:
        raise TypeError(f"{type(unwrap(model)).__name__}: no decoder .layers to shard")
    return list(layers)


def shard(model: nn.Module) -> None:
    """Shard ``model`` in place over the default process group (dim 0 of every parameter, round the ranks).

    Parameters become DTensor shards, so anything holding the old ones (an optimizer) must be built after.
    """
    for layer in decoder_layers(model):
        fully_shard(layer)
    # the root holds the embeddings, final norm and head (tied to the embeddings in SmolLM2/Qwen3: one
    # group, as FSDP requires); not resharded after the forward because the loss reads the head's weight
    fully_shard(model, reshard_after_forward=False)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # a sum: each rank's loss already has the global denominator
            module.set_force_sum_reduction_for_comms(True)  # SUM then divide by 1: no PREMUL_SUM (gloo lacks it)
    setattr(model, _DECODER_METHOD, types.MethodType(_decoder_hidden, model))
    register_fsdp_forward_method(model, _DECODER_METHOD)


def is_sharded(model: nn.Module) -> bool:
    return hasattr(model, _DECODER_METHOD)  # set by shard() only


def decoder_call(model: nn.Module) -> Callable[..., Tensor]:
    """A function of the decoder's keyword arguments to its last hidden states [B, T, H]: through the
    root's FSDP hooks when ``model`` is sharded (else its root weights would be shards), else the decoder."""
    method = getattr(model, _DECODER_METHOD, None)
    if method is not None:
        return method
    return lambda **kwargs: _decoder_hidden(model, **kwargs)


def full(t: Tensor) -> Tensor:
    """The whole tensor behind a shard (an all-gather: every rank must call it, in the same order), or ``t``."""
    return t.full_tensor() if _is_dtensor(t) else t


def shard_like(whole: Tensor, like: Tensor) -> Tensor:
    """``whole`` cut the way ``like`` is (this rank's piece, no communication), or ``whole`` for a plain ``like``."""
    if not _is_dtensor(like):
        return whole
    return distribute_tensor(whole.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def local_numel(params: Iterable[Tensor]) -> int:
    """Elements this rank stores of ``params`` (its shards' for sharded ones)."""
    return sum(p.to_local().numel() if _is_dtensor(p) else p.numel() for p in params)


def gather_to_host(tensors: Mapping[str, Tensor], keep: bool = True) -> dict[str, Tensor]:
    """Host copies of whole ``tensors`` (a name → tensor map), for the rank that ``keep``s them; ``{}`` elsewhere.

    Sharded tensors are gathered one after the other (a collective: every rank calls this, in the same
    order) and dropped at once where not kept, so a rank that does not write holds at most one whole
    tensor at a time, not a whole model and its moments (16 bytes a parameter in host memory, on every rank).
    """
    out = {}
    for name, t in tensors.items():
        if not keep and not _is_dtensor(t):
            continue  # nothing to gather, nothing to keep
        whole = full(t.detach())
        if keep:
            out[name] = whole.to("cpu", copy=True)  # a copy even on a CPU: the caller's snapshot, not the live tensor
        del whole
    return out


def full_optimizer_state(state: dict[str, Any], keep: bool = True) -> dict[str, Any] | None:
    """An optimizer's ``state_dict()`` with every sharded tensor gathered whole, on the host: the layout one
    process saves, so any world size resumes it (collective: every rank calls it); None where not ``keep``."""
    # plain entries (the step count; every moment when nothing is sharded) go to the file as they are
    per_param = {k: {**{n: v for n, v in s.items() if not _is_dtensor(v)},
                     **gather_to_host({n: v for n, v in s.items() if _is_dtensor(v)}, keep)}
                 for k, s in state["state"].items()}
    return {**state, "state": per_param} if keep else None


def reshard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` of a whole-tensor state: cut each moment like its (sharded) parameter."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not _is_dtensor(p):
                continue
            s = optimizer.state.get(p, {})
            for name, v in s.items():
                if isinstance(v, Tensor) and not _is_dtensor(v) and v.shape == p.shape:
                    s[name] = shard_like(v, p)


def _is_dtensor(t: object) -> bool:
    return isinstance(t, DTensor)
