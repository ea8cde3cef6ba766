"""The loss alone: final hidden states [T, H] + lm head [V, H] → scalar loss → gradient of the hidden states.

Implementations (forward KL over the whole vocabulary, temperature 1.1, fp32, all T rows valid):

* ``chunked``: ``opsd_core.algorithm.losses.chunked_divergence_loss`` (rows projected ``chunk`` at a time);
* ``naive``: full [T, V] logits for both roles, fp32 log-softmax, KL, masked mean;
* ``trl``: full logits through TRL's ``compute_full_logit_self_distillation_loss`` (alpha 0) and TRL's
  per-sequence mean, as its trainer does after the model's lm head.

The lm head is frozen (LoRA training), so only the hidden states get a gradient. Peak memory is the
phase peak minus the resident memory once the inputs exist, i.e. what the loss itself adds.
"""

from __future__ import annotations

from typing import Any

from benchmarks.common import Clock, PeakMemory, rss_mb

TEMPERATURE = 1.1
# fp32 [T, V] tensors alive at the naive loss's peak (logits, scaled logits, two log-softmaxes, p_T,
# the difference, the product, and the gradient buffers); used only to decide what to skip
NAIVE_TENSORS = 8


def naive_projected_gb(rows: int, vocab: int) -> float:
    return NAIVE_TENSORS * rows * vocab * 4 / 2**30


def _inputs(rows: int, hidden: int, vocab: int, device: str, seed: int = 0) -> tuple[Any, Any, Any]:
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    hs = torch.randn(1, rows, hidden, generator=gen)
    ht = hs + 0.1 * torch.randn(1, rows, hidden, generator=gen)
    weight = 0.02 * torch.randn(vocab, hidden, generator=gen)
    return hs.to(device).requires_grad_(True), ht.to(device), weight.to(device)


def _loss_fn(impl: str, chunk: int) -> Any:
    import torch
    import torch.nn.functional as F

    if impl == "chunked":
        from opsd_core.algorithm.losses import DivergenceSpec, chunked_divergence_loss

        spec = DivergenceSpec(divergence="forward_kl", support="full", clip="none", temperature=TEMPERATURE)

        def chunked(hs: Any, ht: Any, weight: Any, mask: Any) -> Any:
            return chunked_divergence_loss(hs, ht, weight, mask, spec, chunk_size=chunk)[0]

        return chunked
    if impl == "naive":
        from benchmarks.step_opsd import naive_token_kl

        def naive(hs: Any, ht: Any, weight: Any, mask: Any) -> Any:
            with torch.no_grad():
                t_logits = F.linear(ht, weight)
            kl = naive_token_kl(F.linear(hs, weight), t_logits, TEMPERATURE)
            return (kl * mask).sum() / mask.sum()

        return naive
    if impl == "trl":
        from trl.experimental.sdft.loss_utils import compute_full_logit_self_distillation_loss

        def trl(hs: Any, ht: Any, weight: Any, mask: Any) -> Any:
            with torch.no_grad():
                t_logits = F.linear(ht, weight) / TEMPERATURE
            per_token = compute_full_logit_self_distillation_loss(
                F.linear(hs, weight) / TEMPERATURE, t_logits, distillation_alpha=0.0)
            return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()

        return trl
    raise ValueError(f"unknown loss implementation {impl!r} (chunked, naive, trl)")


def run_kernel(spec: dict[str, Any]) -> dict[str, Any]:
    """Time and peak memory of ``repeats`` forward+backward passes (after ``warmup`` untimed ones)."""
    import torch

    impl, rows, hidden, vocab = spec["impl"], spec["rows"], spec["hidden"], spec["vocab"]
    device = spec["device"]
    out: dict[str, Any] = {"impl": impl, "rows": rows, "hidden": hidden, "vocab": vocab,
                           "chunk": spec.get("chunk", 128), "times_s": [], "skipped": None}
    projected = naive_projected_gb(rows, vocab)
    if impl != "chunked" and projected > spec.get("naive_cap_gb", 8.0):
        out["skipped"] = f"projected {projected:.1f} GB > cap {spec.get('naive_cap_gb', 8.0)} GB"
        return out
    fn = _loss_fn(impl, out["chunk"])
    hs, ht, weight = _inputs(rows, hidden, vocab, device)
    mask = torch.ones(1, rows, device=device)
    clock, mem = Clock(device), PeakMemory(device)
    base_mb = torch.cuda.memory_allocated() / 2**20 if device.startswith("cuda") else rss_mb()
    mem.reset()
    peak = 0.0
    for _ in range(spec.get("warmup", 0)):  # untimed: first-call costs (thread pool, allocator); memory counts
        hs.grad = None
        fn(hs, ht, weight, mask).backward()
    for _ in range(spec["repeats"]):
        hs.grad = None
        start = clock.now()
        loss = fn(hs, ht, weight, mask)
        loss.backward()
        out["times_s"].append(clock.now() - start)
        peak = max(peak, mem.read_mb())
        out["loss"] = float(loss.detach())
        del loss
    out["grad_norm"] = float(hs.grad.norm())
    out["base_mb"] = base_mb
    out["peak_extra_mb"] = max(peak - base_mb, 0.0)
    out["tokens_per_s"] = [rows / t for t in out["times_s"]]
    out["per_phase_memory"] = mem.per_phase
    return out
