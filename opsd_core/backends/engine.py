"""A lean inference engine for frozen Llama-family decoders: packed weights, static KV cache, no padding.

Rollouts and the fixed teacher's pass are inference on weights that do not change within the call,
so they need none of transformers' generality: this engine runs the same math as the transformers
module it is built from (and reads its weights, so updates to that module are seen), with

* q/k/v and gate/up packed into one matrix each: 4 matmuls per layer instead of 7;
* a static KV cache allocated once per call, written in place (no ``torch.cat`` per token);
* prompts prefilled one at a time with a causal kernel, so no compute is spent on padding;
* a plain decode loop: no logits processors, stopping criteria or cache objects per token.

On a 2-core CPU, sampling SmolLM2-135M this way from a merged copy with oneDNN packs is ~2.5x (fp32
copy) and ~2.9x (bf16 copy) faster than ``generate`` on the fp32 LoRA model (``benchmarks/``; without
the packs, ~1.2x faster than ``generate`` on the same bf16 copy). Supported: ``llama``, ``mistral`` (no
sliding window), ``qwen2``, ``qwen3``
(per-head q/k norms); :func:`supports` says whether a module qualifies, callers fall back to
transformers otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from opsd_core.backends.delta_linear import DeltaLinear
from opsd_core.backends.nucleus import nucleus
from opsd_core.backends.packs import LinearPacks, PackedLinear
from opsd_core.backends.row_noise import gumbel_pick
from opsd_core.models.lora import is_lora_layer, unwrap

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


def supports(model: nn.Module) -> str | None:
    """None when the engine can run ``model``'s architecture (LoRA merged first); otherwise why not."""
    lm = unwrap(model)
    cfg = getattr(lm, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED:
        return f"model type {kind!r} is not one of {SUPPORTED}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r} is not silu"
    if getattr(cfg, "use_sliding_window", False) or (kind == "mistral" and getattr(cfg, "sliding_window", None)):
        return "sliding-window attention is not supported"
    return None


class _Proj:
    """One or several row-stacked linear maps applied as one: fused into a single matrix, or not.

    With ``packs`` (CPU, oneDNN), the fused matrix or each part runs through its oneDNN pack.
    """

    def __init__(self, linears: list[nn.Module], fuse: bool, packs: LinearPacks | None) -> None:
        linears = [getattr(m, "base_layer", m) for m in linears]  # a LoRA wrapper's frozen base
        self.parts = linears
        self.packs = packs
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None
        self.fast: PackedLinear | None = None
        # an unmerged LoRA layer (a bf16 sampler's) runs its own product: its delta columns are its own,
        # so it fuses with no other part, and it is not packed (its B columns change every step)
        self.own = [isinstance(m, DeltaLinear) for m in linears]
        if fuse and not any(self.own):
            self.weight, self.bias = _fuse_rows(linears)

    def refresh(self) -> None:
        """Repack the fused matrix for oneDNN (writes through the parts' views are not seen otherwise)."""
        if self.weight is not None and self.packs is not None:
            self.fast = self.packs.pack(self.weight, self.bias)

    def __call__(self, x: Tensor) -> Tensor:
        if self.weight is not None:
            if self.fast is not None:
                return self.fast(x)
            return F.linear(x, self.weight, self.bias)
        outs = []
        for m, own in zip(self.parts, self.own, strict=True):
            if own:
                outs.append(m(x))
                continue
            fast = self.packs.get(m) if self.packs is not None else None
            outs.append(fast(x) if fast is not None else F.linear(x, m.weight, m.bias))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


@dataclass
class _Layer:
    attn_norm: nn.Module
    mlp_norm: nn.Module
    qkv: _Proj
    o: _Proj
    gate_up: _Proj
    down: _Proj
    q_norm: nn.Module | None
    k_norm: nn.Module | None


def _fuse_rows(linears: list[nn.Module]) -> tuple[Tensor, Tensor | None]:
    """Concatenate the rows of several linears and make their weights views of the fused matrix."""
    packed = torch.cat([m.weight.data for m in linears], dim=0)
    bias = None
    if any(m.bias is not None for m in linears):
        bias = torch.cat([m.bias.data if m.bias is not None else torch.zeros(m.out_features, dtype=packed.dtype,
                                                                             device=packed.device)
                          for m in linears])
    row = 0
    for m in linears:
        n = m.out_features
        m.weight.data = packed[row:row + n]
        if m.bias is not None and bias is not None:
            m.bias.data = bias[row:row + n]
        row += n
    return packed, bias


class DecoderEngine:
    """Inference over a frozen transformers Llama-family causal LM (any dtype, any device).

    ``fuse=True`` (decoding): the module's q/k/v and gate/up weights are re-pointed at fused
    matrices, so code that later copies new weights into the module (the rollout sampler's sync)
    updates the engine too; the module must hold no LoRA layers (merge them first).
    ``fuse=False`` (scoring): the module's weights are used as they are, and LoRA wrappers are
    read through to their base layers, so the engine computes the model *without* its adapter at
    no memory cost (the fixed teacher over the policy's own frozen base weights).
    ``packs`` (CPU): the frozen linears run through oneDNN packs (:mod:`opsd_core.backends.packs`), one more
    copy of the weights, shared with any other user of the same ``packs``.
    """

    def __init__(self, model: nn.Module, fuse: bool = True, packs: LinearPacks | None = None) -> None:
        reason = supports(model)
        if reason is not None:
            raise ValueError(f"DecoderEngine: {reason}")
        lm = unwrap(model)
        if fuse and any(is_lora_layer(m) for m in lm.modules()):
            raise ValueError("DecoderEngine: the module holds unmerged LoRA layers (merge them first)")
        decoder = lm.get_decoder()
        cfg = lm.config
        self.embed = getattr(decoder.embed_tokens, "base_layer", decoder.embed_tokens)
        self.norm = decoder.norm
        self.rotary = decoder.rotary_emb
        self.head = _Proj([lm.get_output_embeddings()], False, packs)
        self.n_kv = cfg.num_key_value_heads
        self.n_q = cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_q
        self.layers: list[_Layer] = []
        for block in decoder.layers:
            at, mlp = block.self_attn, block.mlp
            self.layers.append(_Layer(
                block.input_layernorm, block.post_attention_layernorm,
                _Proj([at.q_proj, at.k_proj, at.v_proj], fuse, packs), _Proj([at.o_proj], False, packs),
                _Proj([mlp.gate_proj, mlp.up_proj], fuse, packs), _Proj([mlp.down_proj], False, packs),
                getattr(at, "q_norm", None), getattr(at, "k_norm", None)))
        self.scaling = self.head_dim ** -0.5
        self.refresh()

    def refresh(self) -> None:
        """Repack the fused q/k/v and gate/up matrices for oneDNN after their values were rewritten.

        The other layers' packs notice an in-place write themselves (it bumps the weight's version);
        writes through the views of a packed matrix do not, hence this call after every sync.
        """
        for layer in self.layers:
            layer.qkv.refresh()
            layer.gate_up.refresh()

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    # -- one pass over the layers -------------------------------------------------------------
    def _forward(self, ids: Tensor, positions: Tensor, cache: list[tuple[Tensor, Tensor]] | None,
                 rows: slice | None, cols: slice | None, mask: Tensor | None,
                 rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """ids, positions: [B, T] → final-norm hidden states [B, T, H].

        With ``cache``, the new keys/values are written at ``cache[l][rows, :, cols]`` and attention
        reads the cache up to ``cols.stop`` under ``mask`` ([B, 1, T, S] bool, True = attend); without
        it, attention is causal over ``ids`` alone. ``rope``: cos/sin tables [S, d] indexed by position
        (the rotary module's own values, computed once per call instead of once per token).
        """
        x = self.embed(ids)
        if rope is not None:
            cos, sin = rope[0][positions], rope[1][positions]
        else:
            cos, sin = self.rotary(x, positions)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [B, T, 1, d]: broadcast over heads
        b, t = ids.shape
        nq, nkv, d = self.n_q, self.n_kv, self.head_dim
        for i, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.attn_norm)
            qkv = layer.qkv(h).view(b, t, nq + 2 * nkv, d)
            qk, v = qkv[:, :, :nq + nkv], qkv[:, :, nq + nkv:]
            if layer.q_norm is not None:
                qk = torch.cat([_rms_norm(qk[:, :, :nq], layer.q_norm), _rms_norm(qk[:, :, nq:], layer.k_norm)], 2)
            qk = qk * cos + _rotate_half(qk) * sin  # q and k rotated in one pass
            q, k, v = qk[:, :, :nq].transpose(1, 2), qk[:, :, nq:].transpose(1, 2), v.transpose(1, 2)
            if cache is not None:
                kc, vc = cache[i]
                kc[rows, :, cols] = k
                vc[rows, :, cols] = v
                if mask is not None:  # decoding: attend over the cache; a prefill attends over itself
                    k, v = kc[rows, :, :cols.stop], vc[rows, :, :cols.stop]
            if t == 1 and mask is not None:
                attn = _decode_attention(q, k, v, mask, self.scaling)
            else:
                attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and t > 1,
                                                      scale=self.scaling, enable_gqa=nq != nkv)
            x = x + layer.o(attn.transpose(1, 2).reshape(b, t, nq * d))
            gate, up = layer.gate_up(_rms_norm(x, layer.mlp_norm)).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        return _rms_norm(x, self.norm)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.head(hidden)

    # -- scoring --------------------------------------------------------------------------------
    @torch.no_grad()
    def hidden(self, ids: list[int] | Tensor) -> Tensor:
        """One unpadded sequence [T] → its final hidden states [T, H]."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)[None]
        positions = torch.arange(ids.shape[1], device=self.device)[None]
        return self._forward(ids, positions, None, None, None, None)[0]

    # -- sampling -------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], max_new_tokens: int, *, temperature: float, top_k: int,
                 top_p: float, eos_ids: set[int], pad_id: int, min_new_tokens: int = 0,
                 generator: torch.Generator | None = None, row_seeds: list[int] | None = None) -> Tensor:
        """Sample up to ``max_new_tokens`` per prompt → [B, N] ids (``pad_id`` after a row's end).

        Same distribution as transformers' sampling with these settings: EOS suppressed before
        ``min_new_tokens``, then temperature, top-k, top-p (nucleus keeps the smallest set whose
        mass reaches ``top_p``, at least one token), then a draw: from ``generator`` (multinomial), or,
        with ``row_seeds`` (one per prompt), from each row's own counter-based noise
        (:mod:`opsd_core.backends.row_noise`), so a row's sample does not depend on the batch it is in.
        """
        # inference mode: no version counters or view tracking on the ~100 small ops a token costs
        with torch.inference_mode():
            seeds = None if row_seeds is None else torch.tensor(row_seeds, dtype=torch.int64, device=self.device)
            out = self._generate(prompts, max_new_tokens, temperature, top_k, top_p, eos_ids, pad_id,
                                 min_new_tokens, generator, seeds)
        return out.clone()  # an ordinary tensor: callers feed it to autograd passes

    def _generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_k: int,
                  top_p: float, eos_ids: set[int], pad_id: int, min_new_tokens: int,
                  generator: torch.Generator | None, seeds: Tensor | None) -> Tensor:
        dev = self.device
        bsz = len(prompts)
        width = max(len(p) for p in prompts)
        shape = (bsz, self.n_kv, width + max_new_tokens, self.head_dim)
        # zeros, not empty: masked columns still meet V in the product, and 0 x NaN would be NaN
        cache = [(torch.zeros(shape, dtype=self.dtype, device=dev), torch.zeros(shape, dtype=self.dtype, device=dev))
                 for _ in self.layers]
        lengths = torch.tensor([len(p) for p in prompts], device=dev)
        start = width - lengths  # prompts right-aligned at column `width`, as with left padding
        columns = torch.arange(width + max_new_tokens, device=dev)
        cos, sin = self.rotary(self.embed.weight[:1], columns[None])
        rope = (cos[0], sin[0])
        attend = (columns[None] >= start[:, None])[:, None, None, :]  # [B, 1, 1, S]: not a left pad
        last = []
        for r, prompt in enumerate(prompts):
            ids = torch.tensor(prompt, dtype=torch.long, device=dev)[None]
            pos = columns[None, :len(prompt)]
            h = self._forward(ids, pos, cache, slice(r, r + 1), slice(width - len(prompt), width), None, rope)
            last.append(h[:, -1])
        logits = self.logits(torch.cat(last))
        eos = torch.tensor(sorted(eos_ids), device=dev)
        out = torch.full((bsz, max_new_tokens), pad_id, dtype=torch.long, device=dev)
        done = torch.zeros(bsz, dtype=torch.bool, device=dev)
        for step in range(max_new_tokens):
            if step < min_new_tokens:
                logits[:, eos] = float("-inf")
            token = _draw(logits.float(), temperature, top_k, top_p, generator, seeds, step)
            token = torch.where(done, torch.full_like(token, pad_id), token)
            out[:, step] = token
            done |= torch.isin(token, eos)
            if bool(done.all()) or step + 1 == max_new_tokens:
                break
            col = width + step
            pos = (lengths + step)[:, None]
            h = self._forward(token[:, None], pos, cache, slice(None), slice(col, col + 1), attend[..., :col + 1], rope)
            logits = self.logits(h[:, -1])
        return out


def _decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """One query per row against the cache: q [B, nq, 1, d], k/v [B, nkv, S, d], mask [B, 1, 1, S] → [B, nq, 1, d].

    Grouped heads are folded into the query axis, so K/V are read once and never expanded; about
    2x faster than the fused CPU kernel at one query, and the softmax is taken in fp32.
    """
    b, nq, _, d = q.shape
    nkv = k.shape[1]
    scores = (q.view(b, nkv, nq // nkv, d) @ k.transpose(-1, -2)) * scale  # [B, nkv, g, S]
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1, dtype=torch.float32)
    return (probs.to(v.dtype) @ v).view(b, nq, 1, d)


def _rms_norm(x: Tensor, norm: nn.Module) -> Tensor:
    """transformers' Llama RMSNorm (statistics in fp32, scaled in the input dtype) as one fused kernel."""
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None:
        return norm(x)
    # the fused kernel accumulates in fp32 for bf16 input and rounds once, as transformers' .to(dtype)
    return norm.weight * F.rms_norm(x, (x.shape[-1],), eps=eps)


def _rotate_half(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def filter_logits(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """logits [B, V] → temperature-scaled logits with -inf outside the top-k and the top-p nucleus.

    The same rule as transformers' temperature, top-k and top-p warpers, in that order: top-k keeps
    ties with the k-th value; top-p drops the tokens whose ascending cumulative mass stays within
    1 - top_p, always keeping the most likely one.
    """
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= 1 - top_p
        drop_sorted[:, -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def candidates(logits: Tensor, temperature: float, top_k: int, top_p: float) -> tuple[Tensor, Tensor | None]:
    """logits [B, V] → (probs [B, C], ids [B, C] or None): the sampling distribution of :func:`filter_logits`.

    With top-k on, only the k best tokens (and those tied with the k-th, which top-k keeps too) can
    be drawn, so top-p and the draw run over a short candidate list (sorting and drawing over a
    49k-152k vocabulary cost ~10 ms a token on a CPU); ``ids`` maps them back. When the ties do not
    fit in the list, the whole vocabulary is used.
    """
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        width = min(vocab, 2 * top_k + 16)  # room for ties at the k-th value (common with bf16 logits)
        values, ids = torch.topk(logits, width, dim=-1)  # descending
        kth = values[:, top_k - 1:top_k]
        if width == vocab or not bool(((logits >= kth).sum(dim=-1) > width - 1).any()):
            values = values.masked_fill(values < kth, float("-inf"))
            return filter_logits(values, temperature, 0, top_p).softmax(dim=-1), ids
    return filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1), None


def draw_candidates(logits: Tensor, temperature: float, top_k: int, top_p: float) -> tuple[Tensor, Tensor | None]:
    """logits [B, V] → (probs [B, C], ids [B, C] or None): what a draw runs over, the same distribution as
    :func:`candidates`. Without top-k, the top-p nucleus alone (:func:`~opsd_core.backends.nucleus.nucleus`:
    no sort of V, no noise for the tokens outside it); with top-k, :func:`candidates` as it is (the
    default profiles' rollouts stay the same token for token)."""
    if top_p < 1.0 and not 0 < top_k < logits.shape[-1]:
        return nucleus(logits, temperature, top_p)
    return candidates(logits, temperature, top_k, top_p)


def _draw(logits: Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None,
          seeds: Tensor | None = None, step: int = 0) -> Tensor:
    """logits [B, V] fp32 → one sampled id per row [B] (``seeds`` [B]: each row's own noise at ``step``)."""
    probs, ids = draw_candidates(logits, temperature, top_k, top_p)
    if seeds is not None:
        return gumbel_pick(probs, ids, seeds, step)
    pick = torch.multinomial(probs, 1, generator=generator)
    return (pick if ids is None else ids.gather(1, pick)).squeeze(1)
