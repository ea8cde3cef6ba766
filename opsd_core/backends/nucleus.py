"""Top-p (nucleus) filtering without sorting the vocabulary, for draws with ``top_k: 0``.

The plain rule (:func:`opsd_core.backends.engine.filter_logits`) sorts all V logits of every row and the
per-row Gumbel draw then hashes all V token ids: at V = 152k on a CPU those two cost about as much as the lm
head's product itself (``python -m benchmarks.row_noise``). A language model's nucleus is mostly a few
tokens to a few hundred, so here it is found among the ``k`` best tokens (``torch.topk``, one pass), ``k``
growing only when some row's nucleus does not fit, and only the nucleus goes on to the draw: the noise of a
token is a function of its id alone (:mod:`opsd_core.backends.row_noise`), so drawing over the nucleus picks
the token the full-vocabulary draw picks, whatever else is in the list.
"""

from __future__ import annotations

import torch
from torch import Tensor

FIRST = 64  # candidates tried first: holds the nucleus of most decoding steps
GROW = 8  # then 512, then 4096 ...
# past this, one full sort (a nucleus this wide is a near-uniform distribution, no short list to find);
# measured at 16 x 152k on a CPU: topk 39 ms at k = 4096, 98 ms at 32768, the sort 321 ms
MAX_TOPK = 4096


def nucleus(logits: Tensor, temperature: float, top_p: float) -> tuple[Tensor, Tensor]:
    """logits [B, V] fp32 → (probs [B, C], ids [B, C]): ``softmax(logits / temperature)`` restricted to each
    row's top-p nucleus and renormalised; entries past a row's nucleus have probability 0. C is at least the
    largest nucleus of the batch (the padding never changes which token a row draws).

    The rule of ``filter_logits(logits, temperature, 0, top_p)``: a token is kept when the mass of the
    tokens ranked above it is below ``top_p``, the most likely token always (ties at the boundary are kept
    in ``topk``'s order, as the plain rule keeps them in ``sort``'s). ``top_p`` < 1.
    """
    scaled = logits / temperature
    vocab = scaled.shape[-1]
    log_z = torch.logsumexp(scaled, dim=-1, keepdim=True)  # the full softmax's normaliser: one pass over V
    k = min(vocab, FIRST)
    while True:
        if k > MAX_TOPK:
            k = vocab
            values, ids = torch.sort(scaled, dim=-1, descending=True)
        else:
            values, ids = torch.topk(scaled, k, dim=-1)  # descending
        probs = (values - log_z).exp()
        above = probs.cumsum(dim=-1) - probs  # mass of the candidates ranked above each one
        keep = above < top_p
        keep[:, 0] = True
        # the list's last token is out of every row's nucleus: so is every token not in the list
        if k == vocab or not bool(keep[:, -1].any()):
            break
        k = min(vocab, k * GROW)
    width = int(keep.sum(dim=-1).max())
    probs = probs[:, :width].masked_fill(~keep[:, :width], 0.0)
    return probs / probs.sum(dim=-1, keepdim=True), ids[:, :width]
