"""The machine's matmul limit and the model FLOPs of one OPSD/SDFT training step.

Model FLOPs count the *useful* work of a step, the same number for every implementation at the same
settings (padding, recomputation and full-sequence logits are not counted), so achieved fraction =
model FLOPs / step time / measured matmul FLOP/s, and ratios of it equal ratios of speed.

Per sequence with prompt length P (student P_s, teacher P_t) and completion length L, with
N = decoder matmul weights (attention + MLP projections; embeddings are a lookup), N_lora = LoRA
weights, N_head = V·H (the lm head), layers l, query width d = heads·head_dim:

* causal attention over a block of T new tokens after C cached ones: ``attn(C, T) = 4·l·d·Σ_{j<T} (C+j+1)``
  (QKᵀ and AV, 2 FLOPs per multiply-add each).
* sampling:  ``2(N+N_lora)(P_s+L) + 2·N_head·L + attn(0, P_s+L)`` (prefill and decode, one logit row per
  generated token).
* teacher forward (no gradient, adapter off): ``2N(P_t+L) + 2·N_head·L + attn(0, P_t+L)``.
* student forward: ``2(N+N_lora)(P_s+L) + 2·N_head·L + attn(0, P_s+L)``.
* student backward: activation gradients cost one forward of every matmul (``2(N+N_lora)(P_s+L) +
  2·N_head·L``) and twice the attention; weight gradients only for trainable weights
  (``2·N_lora(P_s+L)`` with LoRA; frozen base weights and lm head need none).
* the optimizer and the divergence's element-wise work (O(L·V)) are not counted.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    attn_width: int  # heads * head_dim of the queries
    vocab: int
    decoder_matmul_params: int
    lora_params: int

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_shape(model: Any) -> ModelShape:
    """Read the shape of a (possibly LoRA-wrapped) transformers causal LM."""
    import torch

    from opsd_core.models.lora import unwrap

    base = unwrap(model)
    cfg = base.config.get_text_config()
    head = base.get_output_embeddings()
    head_id = id(head.weight) if head is not None else None
    lora = 0
    dense = 0
    for name, module in base.named_modules():
        if not isinstance(module, torch.nn.Linear) or id(module.weight) == head_id:
            continue
        if "lora_" in name:
            lora += module.weight.numel()
        else:
            dense += module.weight.numel()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return ModelShape(
        layers=cfg.num_hidden_layers,
        hidden=cfg.hidden_size,
        attn_width=cfg.num_attention_heads * head_dim,
        vocab=head.weight.shape[0] if head is not None else cfg.vocab_size,
        decoder_matmul_params=dense,
        lora_params=lora,
    )


def attention_flops(shape: ModelShape, cached: int, new: int) -> float:
    """Causal attention FLOPs for ``new`` tokens after ``cached`` ones (closed form of the sum)."""
    total_ctx = new * cached + new * (new + 1) / 2
    return 4.0 * shape.layers * shape.attn_width * total_ctx


def step_flops(shape: ModelShape, sequences: list[tuple[int, int, int]]) -> dict[str, float]:
    """Model FLOPs of one step; sequences: (student prompt, teacher prompt, completion) lengths."""
    n, nl, nh = shape.decoder_matmul_params, shape.lora_params, shape.head_params
    out = {"sampling": 0.0, "teacher_forward": 0.0, "student_forward": 0.0, "student_backward": 0.0}
    for ps, pt, length in sequences:
        s_tokens = ps + length
        s_attn = attention_flops(shape, 0, s_tokens)
        out["sampling"] += 2 * (n + nl) * s_tokens + 2 * nh * length + s_attn
        out["teacher_forward"] += 2 * n * (pt + length) + 2 * nh * length + attention_flops(shape, 0, pt + length)
        out["student_forward"] += 2 * (n + nl) * s_tokens + 2 * nh * length + s_attn
        out["student_backward"] += 2 * (n + nl) * s_tokens + 2 * nh * length + 2 * s_attn + 2 * nl * s_tokens
    out["total"] = sum(out.values())
    return out


def measure_matmul(size: int, dtype_name: str, device: str, repeats: int = 5) -> dict[str, Any]:
    """Best-of-``repeats`` dense ``size``³ matmul throughput (FLOP/s) at the process's thread count.

    On a CPU every kernel torch can reach is timed (``torch.mm``, i.e. the BLAS library, and oneDNN's
    packed inner product, which opsd uses for frozen weights) and the limit is the fastest: the two
    differ by 2x on some machines (MKL on AMD CPUs), and a limit set by the slower one would flatter
    every achieved fraction.
    """
    import torch

    from opsd_core.backends.capabilities import probe
    from opsd_core.backends.packs import PackedLinear

    dtype = getattr(torch, dtype_name)
    caps = probe()
    packable = caps.onednn_fp32 if dtype == torch.float32 else caps.onednn_bf16 if dtype == torch.bfloat16 else False
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    kernels: dict[str, Any] = {"torch.mm": lambda: a @ b}
    if device == "cpu" and packable:
        packed = PackedLinear(b.t())  # x @ b as a linear layer with weight bᵀ
        kernels["onednn"] = lambda: packed(a)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    inner = 20 if device.startswith("cuda") else 1
    flop = 2.0 * size**3
    by_kernel: dict[str, dict[str, Any]] = {}
    for name, fn in kernels.items():
        fn()  # warm-up: thread pool, allocator, kernel selection
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            sync()
            times.append((time.perf_counter() - start) / inner)
        by_kernel[name] = {"flops_best": flop / min(times), "flops_median": flop / sorted(times)[len(times) // 2],
                           "seconds": times}
    best = max(by_kernel, key=lambda k: by_kernel[k]["flops_best"])
    return {
        "size": size,
        "dtype": dtype_name,
        "threads": torch.get_num_threads(),
        "kernel": best,
        "flops_best": by_kernel[best]["flops_best"],
        "flops_median": by_kernel[best]["flops_median"],
        "seconds": by_kernel[best]["seconds"],
        "kernels": {k: v["flops_best"] for k, v in by_kernel.items()},
    }
