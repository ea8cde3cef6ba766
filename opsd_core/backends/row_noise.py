"""Sampling noise that belongs to a rollout, not to a batch: counter-based Gumbel noise.

A draw from a shared generator depends on which other rows share the batch, so the same rollout
would come out differently on 1 rank and on 2. Here every random number is a hash of (the row's
seed, the decoding step, the token id): rollout ``i`` of step ``s`` gets the same noise whichever
process, batch or device draws it, with no generator state and no host sync. Sampling is the
Gumbel-max trick, ``argmax(log p + G)`` with ``G = -log(-log U)``, an exact draw from ``p``.

The hash is Wellons' 32-bit ``lowbias32`` in int64 arithmetic, with the 32-bit products split so that
no intermediate leaves int64's range (signed overflow is not something to rely on across devices).
"""

from __future__ import annotations

import torch
from torch import Tensor

_MASK = 0xFFFFFFFF


def _mul32(x: Tensor, m: int) -> Tensor:
    """(x · m) mod 2³² for int64 ``x`` in [0, 2³²) and a 32-bit constant ``m``, without overflow."""
    lo, hi = m & 0xFFFF, m >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK


def hash32(x: Tensor) -> Tensor:
    """lowbias32 on int64 values in [0, 2³²) → int64 values in [0, 2³²)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform(seeds: Tensor, step: int, ids: Tensor) -> Tensor:
    """U(0, 1) noise, float64 [B, K]: one value per (row seed [B], decoding step, token id [B, K])."""
    h = hash32(seeds.to(torch.int64)[:, None] & _MASK)
    h = hash32(h ^ (step & _MASK))
    h = hash32(h ^ (ids.to(torch.int64) & _MASK))
    return (h.to(torch.float64) + 0.5) / 2.0**32


def gumbel_pick(probs: Tensor, ids: Tensor | None, seeds: Tensor, step: int) -> Tensor:
    """One draw per row from ``probs`` [B, K] over the token ids ``ids`` [B, K] (None: 0..K-1) → ids [B].

    Zero-probability entries are never picked.
    """
    if ids is None:
        ids = torch.arange(probs.shape[-1], device=probs.device).expand_as(probs)
    u = uniform(seeds.to(probs.device), step, ids)
    scores = probs.double().log() - (-u.log()).log()
    pick = scores.argmax(dim=-1, keepdim=True)
    return ids.gather(1, pick).squeeze(1)
