"""Scoring batches: prompt ⊕ completion with left padding, hidden states only where needed.

Both roles score the same completion tensor; only the (left-padded) prefix differs. Because every
prompt is right-aligned at column P, completion token j sits at column P + j and is predicted by the
hidden state at column P + j - 1, so the completion slice is one contiguous block for the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from opsd_core.algorithm.rollout import left_pad
from opsd_core.backends.engine import DecoderEngine
from opsd_core.backends.fsdp import decoder_call
from opsd_core.models.lora import unwrap


@dataclass
class ScoringBatch:
    """input_ids / attention_mask / position_ids: [B, P + L]; prompt_width P; completion length L."""

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    prompt_width: int
    completion_len: int

    def to(self, device: torch.device) -> ScoringBatch:
        return ScoringBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
            self.prompt_width, self.completion_len,
        )

    def completion_ids(self) -> Tensor:
        """[B, L] the completion tokens as laid out in this batch."""
        return self.input_ids[:, self.prompt_width:self.prompt_width + self.completion_len]


def build_scoring_batch(
    prompts: list[list[int]], completion_ids: Tensor, completion_mask: Tensor, pad_id: int
) -> ScoringBatch:
    """prompts: B id lists; completion_ids/mask: [B, L] (right-padded) → a left-padded batch."""
    prompt_ids, prompt_attn = left_pad(prompts, pad_id)
    ids = torch.cat([prompt_ids, completion_ids.to(prompt_ids.dtype)], dim=1)
    attn = torch.cat([prompt_attn, completion_mask.to(prompt_attn.dtype)], dim=1)
    # positions count real tokens only, as generate does for left-padded prompts
    pos = (torch.cumsum(attn, dim=1) - 1).clamp(min=0)
    return ScoringBatch(ids, attn, pos, prompt_ids.shape[1], completion_ids.shape[1])


def right_pad(sequences: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad id lists into a completion block → (ids [B, L] int64, mask [B, L] bool)."""
    width = max(1, max(len(s) for s in sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for i, seq in enumerate(sequences):
        ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, :len(seq)] = True
    return ids, mask


def lm_head(model: nn.Module) -> nn.Module:
    head = unwrap(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(unwrap(model)).__name__} has no output embeddings (lm head)")
    return head


def completion_hidden(model: nn.Module, batch: ScoringBatch) -> Tensor:
    """Final hidden states that predict the completion tokens: [B, L, H].

    Runs the decoder only (no lm head), so logits are never formed for prompt positions (through the
    root's FSDP hooks when ``model`` is sharded: :func:`~opsd_core.backends.fsdp.decoder_call`).
    """
    hidden = decoder_call(model)(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    )
    start = batch.prompt_width - 1
    return hidden[:, start:start + batch.completion_len]


def engine_completion_hidden(engine: DecoderEngine, batch: ScoringBatch) -> Tensor:
    """:func:`completion_hidden` computed by the engine, one row at a time without padding: [B, L, H].

    Row b is its real prompt tokens followed by the whole completion block; pads after an EOS only
    feed positions after it (causal), which the loss masks, so the kept rows match the padded pass.
    """
    p, n = batch.prompt_width, batch.completion_len
    ids = batch.input_ids.to(engine.device)
    keep = batch.attention_mask[:, :p].bool().to(engine.device)
    rows = []
    for b in range(ids.shape[0]):
        seq = torch.cat([ids[b, :p][keep[b]], ids[b, p:p + n]])
        start = int(keep[b].sum()) - 1
        rows.append(engine.hidden(seq)[start:start + n])
    return torch.stack(rows)


def assert_same_completion(student: ScoringBatch, teacher: ScoringBatch) -> None:
    """Both roles must score exactly the same token ids at the same completion positions."""
    if student.completion_len != teacher.completion_len or not torch.equal(
        student.completion_ids(), teacher.completion_ids()
    ):
        raise AssertionError("student and teacher batches do not hold the same completion token ids")
