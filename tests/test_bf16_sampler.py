"""A bf16 sampler for a LoRA policy samples the policy, not its base (issue 26).

The gpu profile's first steps: bf16 base weights (rms 2e-2) and a LoRA delta of rms ~1e-5, below bf16's
resolution of those weights. How much of the policy's change in logits the sampler's logits carry is the
regression slope ``beta = <D_sampler, D_policy> / <D_policy, D_policy>`` of the sampler's change on the fp32
policy's change, over 4608 positions (the bf16 forward adds rounding noise ~10x the delta's own effect at
each logit, which the slope averages out: its spread over seeds was ~0.04). Measured with this seed: 1.03 on
every path; before issue 26 0.34-0.35 (the merged bf16 copy; ``generate`` sampled the bf16 policy itself,
whose peft forward loses the delta the same way). Over four other seeds: 0.96-1.03, and 0.28-0.34 merged.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from opsd_core.algorithm.rollout import eos_token_ids, sample
from opsd_core.backends.base import Backend
from opsd_core.backends.engine import DecoderEngine
from opsd_core.backends.sampler import PolicySampler
from opsd_core.config import Params
from opsd_core.models.lora import iter_effective_weights, lora_layers, wrap_lora
from opsd_core.models.sources import load_model_and_tokenizer
from tests.support import load_policy, toy_problems

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def _bf16_policy(params: Params, rms: float, device: str) -> torch.nn.Module:
    """The smoke model with bf16 base weights and fp32 LoRA factors (as ``train.precision=bfloat16`` builds it),
    every adapted layer's delta s·B·A scaled to rms ``rms``."""
    model, _ = load_model_and_tokenizer(params.model, ROOT, dtype=torch.bfloat16)
    torch.manual_seed(0)
    model = wrap_lora(model, params.lora)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
            b.copy_(torch.randn(b.shape, generator=gen))
            b.mul_(rms / (s * b @ a).pow(2).mean().sqrt())
    return model.to(device).eval()


def _logits(module: torch.nn.Module | DecoderEngine, ids: torch.Tensor) -> torch.Tensor:
    """[B, T] ids → fp32 logits [B, T, V] on the CPU, from an engine (row by row) or a transformers module."""
    with torch.no_grad():
        if isinstance(module, DecoderEngine):
            return torch.stack([module.logits(module.hidden(row)) for row in ids]).float().cpu()
        return module(input_ids=ids).logits.float().cpu()


def _zero_delta(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    saved = {}
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            saved[name] = layer.lora_B["default"].weight.clone()
            layer.lora_B["default"].weight.zero_()
    return saved


def _restore(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            layer.lora_B["default"].weight.copy_(saved[name])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["engine", "generate", "static"])
def test_bf16_sampler_logits_move_with_a_small_lora_delta(smoke: Params, backend: str, device: str) -> None:  # noqa: F811
    policy = _bf16_policy(smoke, 1e-5, device)
    vocab = policy.get_base_model().config.vocab_size
    ids = torch.randint(3, vocab, (48, 96), generator=torch.Generator().manual_seed(2)).to(device)
    reference = copy.deepcopy(policy).float()  # the policy in exact arithmetic: what the delta does
    with torch.no_grad():
        moved = _logits(reference, ids)
        with reference.disable_adapter():
            expected = moved - _logits(reference, ids)
    sampler = PolicySampler(policy, torch.bfloat16, backend)
    with_delta = _logits(sampler.module(), ids)
    saved = _zero_delta(policy)
    try:
        got = with_delta - _logits(sampler.module(), ids)  # module() syncs the copy from the policy
    finally:
        _restore(policy, saved)
    assert float(expected.abs().max()) > 0
    beta = float((got * expected).sum() / (expected * expected).sum())
    assert 0.75 < beta < 1.25, f"{backend}: the bf16 sampler's logits carry {beta:.2f} of the policy's change"
    # the sampled copy is the sampler dtype's (the delta's own factors aside)
    assert _logits(sampler.module(), ids[:1]).dtype == torch.float32 and sampler.copy is not None
    assert next(sampler.copy.parameters()).dtype == torch.bfloat16


def test_the_bf16_sampler_is_described_and_samples_on_every_path(smoke: Params) -> None:  # noqa: F811
    policy = _bf16_policy(smoke, 1e-5, "cpu")
    backend = Backend(policy, torch.bfloat16, "static")
    assert backend.describe_sampler() == "transformers generate, static cache on a bfloat16 copy, LoRA delta unmerged"
    _, tok = load_model_and_tokenizer(smoke.model, ROOT)
    prompts = [p.student_ids for p in toy_problems(tok)]
    cfg = smoke.opsd.sampling.model_copy(update={"max_new_tokens": 6})
    for kind in ("engine", "generate", "static"):
        sampler = PolicySampler(policy, torch.bfloat16, kind)
        out = sample(sampler.module(), prompts, cfg, tok.pad_token_id, eos_token_ids(policy, tok), [5, 6, 7, 8],
                     torch.device("cpu"), options=sampler.generate_options)
        assert out.num_tokens > 0, kind


@pytest.mark.parametrize("backend", ["engine", "generate", "static"])
def test_the_fp32_sampler_still_decodes_the_merged_copy_bit_for_bit(smoke: Params, backend: str) -> None:  # noqa: F811
    """float32 sampling (the CPU default) is what it was: the merged copy, its logits and rollouts unchanged."""
    model, tok = load_policy(smoke)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    sampler = PolicySampler(model, torch.float32, backend)
    module = sampler.module()
    # the copy as the sampler built it before issue 26: peft's merge, then the fp32 effective weights copied in
    merged = copy.deepcopy(model).merge_and_unload().eval().requires_grad_(False)
    with torch.no_grad():
        for name, weight in iter_effective_weights(model):
            merged.get_submodule(name.removeprefix("base_model.model.")).weight.copy_(weight)
    old = DecoderEngine(merged) if backend == "engine" else merged
    if backend == "generate":  # in the policy's own dtype, generate samples the policy itself, as before
        assert module is model
        old = model
    ids = torch.tensor([p.student_ids[:24] for p in toy_problems(tok)[:2]])
    assert torch.equal(_logits(module, ids), _logits(old, ids))
    prompts = [p.student_ids for p in toy_problems(tok)]
    cfg = smoke.opsd.sampling.model_copy(update={"max_new_tokens": 12})
    draws = [sample(m, prompts, cfg, tok.pad_token_id, eos_token_ids(model, tok), [1, 2, 3, 4], torch.device("cpu"),
                    options=sampler.generate_options) for m in (module, old)]
    assert torch.equal(draws[0].completion_ids, draws[1].completion_ids)


def test_adapters_the_copy_cannot_carry_unmerged_are_merged_and_said(smoke: Params) -> None:  # noqa: F811
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    base, _ = load_model_and_tokenizer(smoke.model, ROOT, dtype=torch.bfloat16)
    dora = get_peft_model(base, PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True))
    messages: list[str] = []
    sampler = PolicySampler(dora, torch.bfloat16, "engine", log=messages.append)
    assert not sampler.deltas and sampler.engine is not None
    assert any("merged" in m for m in messages)
