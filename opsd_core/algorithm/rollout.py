"""On-policy sampling, token ids end to end: opsd's decoder engine or transformers ``generate``."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from opsd_core.backends.engine import DecoderEngine, draw_candidates
from opsd_core.backends.row_noise import gumbel_pick
from opsd_core.config import SamplingConfig
from opsd_core.models.lora import unwrap


@dataclass
class Rollouts:
    """Sampled completions, right-padded.

    completion_ids: [B, L] int64 (pad after the end), completion_mask: [B, L] bool (valid tokens,
    the end-of-sequence token included), ended: [B] bool (an EOS was produced within the budget).
    """

    completion_ids: Tensor
    completion_mask: Tensor
    ended: Tensor
    seconds: float

    @property
    def num_tokens(self) -> int:
        return int(self.completion_mask.sum())


def left_pad(sequences: list[list[int]], pad_id: int, multiple: int = 1) -> tuple[Tensor, Tensor]:
    """Left-pad id lists → (ids [B, T], attention_mask [B, T]); T is the longest length rounded up to a
    multiple of ``multiple``."""
    width = -(-max(len(s) for s in sequences) // multiple) * multiple
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq):] = 1
    return ids, mask


def completion_mask_from_ids(completion_ids: Tensor, eos_ids: set[int]) -> tuple[Tensor, Tensor]:
    """Valid-token mask up to and including the first EOS; [B, L] → ([B, L] bool, [B] ended)."""
    is_eos = torch.zeros_like(completion_ids, dtype=torch.bool)
    for eos in eos_ids:
        is_eos |= completion_ids == eos
    # eos_before[t] = an EOS occurred strictly before position t
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long() > 0
    return ~eos_before, is_eos.any(dim=1)


def eos_token_ids(model: nn.Module, tokenizer) -> set[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    if not ids:
        raise ValueError("model and tokenizer define no end-of-sequence token")
    return ids


def _finish(completion: Tensor, n_prompts: int, pad_id: int, eos_ids: set[int], seconds: float) -> Rollouts:
    completion = completion.cpu()
    if completion.shape[1] == 0:  # nothing generated at all: keep shapes valid
        completion = torch.full((n_prompts, 1), pad_id, dtype=torch.long)
    mask, ended = completion_mask_from_ids(completion, eos_ids)
    completion = completion.masked_fill(~mask, pad_id)
    return Rollouts(completion, mask, ended, seconds)


class _RowNoiseDraw(LogitsProcessor):
    """A transformers logits processor that makes greedy ``generate`` sample as the engine does: the
    same temperature / top-k / top-p rule, then each row's own counter-based noise (Gumbel-max), the
    chosen token left as the only finite score."""

    def __init__(self, cfg: SamplingConfig, seeds: list[int], width: int) -> None:
        self.cfg, self.seeds, self.width = cfg, torch.tensor(seeds, dtype=torch.int64), width

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        probs, ids = draw_candidates(scores.float(), self.cfg.temperature, self.cfg.top_k, self.cfg.top_p)
        pick = gumbel_pick(probs, ids, self.seeds.to(scores.device), input_ids.shape[1] - self.width)
        return torch.full_like(scores, float("-inf")).scatter_(1, pick[:, None], 0.0)


@torch.no_grad()
def sample(
    model: nn.Module | DecoderEngine,
    prompts: list[list[int]],
    cfg: SamplingConfig,
    pad_id: int,
    eos_ids: set[int],
    seed: int | list[int],
    device: torch.device,
    options: Mapping[str, Any] | None = None,
) -> Rollouts:
    """Sample one completion per prompt from ``model`` (its current weights, adapter included).

    ``model`` is a :class:`DecoderEngine` (opsd's decode loop) or a transformers module (``generate``).
    ``seed``: one for the batch (a shared generator), or one per prompt: each row then draws from its own
    counter-based noise (:mod:`opsd_core.backends.row_noise`), so a rollout does not depend on the batch it is
    sampled in (what makes N ranks sample what one process samples); the engine and ``generate`` then
    draw the same token from the same logits. ``options`` (``generate`` only): ``pad_prompts_to`` left-pads
    the prompt batch to a multiple of that many tokens (fixed shapes for a compiled static cache; the
    attention mask hides the padding), the rest go to ``generate`` as they are.
    """
    row_seeds = seed if isinstance(seed, list) else None
    if row_seeds is not None and len(row_seeds) != len(prompts):
        raise ValueError(f"{len(row_seeds)} row seeds for {len(prompts)} prompts")
    if isinstance(model, DecoderEngine):
        generator = None if row_seeds else torch.Generator(device=model.device).manual_seed(int(seed))
        start = time.perf_counter()
        out = model.generate(prompts, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                             top_p=cfg.top_p, eos_ids=eos_ids, pad_id=pad_id,
                             min_new_tokens=cfg.min_new_tokens, generator=generator, row_seeds=row_seeds)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return _finish(out, len(prompts), pad_id, eos_ids, time.perf_counter() - start)
    extra = dict(options or {})
    ids, attn = left_pad(prompts, pad_id, multiple=int(extra.pop("pad_prompts_to", 1)))
    ids, attn = ids.to(device), attn.to(device)
    was_training = model.training
    model.eval()
    if row_seeds is None:
        torch.manual_seed(int(seed))
        if device.type == "cuda":
            torch.cuda.manual_seed_all(int(seed))
        draw: dict = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p,
                      "top_k": cfg.top_k if cfg.top_k > 0 else None}
    else:
        # greedy over scores where only the row's own draw is finite; the model's own sampling
        # defaults (temperature, top-k/p in its generation_config) must not apply a second time
        draw = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None,
                "logits_processor": LogitsProcessorList([_RowNoiseDraw(cfg, row_seeds, ids.shape[1])])}
    # transformers fills every setting left unset from the checkpoint's generation_config (a
    # repetition_penalty, suppressed tokens, min_p, ...): rollouts would silently leave the policy's
    # distribution. With a blank one, only opsd.sampling applies.
    inner = unwrap(model)
    saved, inner.generation_config = inner.generation_config, GenerationConfig()
    start = time.perf_counter()
    try:
        out = model.generate(
            input_ids=ids,
            attention_mask=attn,
            max_new_tokens=cfg.max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=sorted(eos_ids),
            min_new_tokens=cfg.min_new_tokens or None,
            use_cache=True,
            **draw,
            **extra,
        )
    finally:
        inner.generation_config = saved
    seconds = time.perf_counter() - start
    model.train(was_training)
    return _finish(out[:, ids.shape[1]:], len(prompts), pad_id, eos_ids, seconds)

