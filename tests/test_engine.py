"""The decoder engine computes what transformers computes: logits, greedy decoding, sampling filters."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from opsd_core.algorithm.rollout import left_pad
from opsd_core.backends.engine import DecoderEngine, candidates, filter_logits, supports
from opsd_core.config import load_params
from opsd_core.models.sources import load_model_and_tokenizer
from tests.support import random_model

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [list(range(40, 57)), list(range(60, 65)), list(range(70, 81))]  # different lengths: padding matters


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    params = load_params(ROOT / "params.yaml", "smoke", [f"model.cache_dir={tmp_path_factory.mktemp('m')}"])
    model, _ = load_model_and_tokenizer(params.model, ROOT)
    return model.eval()


def _models(tiny: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {"tiny-llama": tiny, "qwen2": random_model("qwen2"), "qwen3": random_model("qwen3")}


def test_engine_logits_equal_the_transformers_forward(tiny: torch.nn.Module) -> None:
    for name, model in _models(tiny).items():
        reference = copy.deepcopy(model)
        engine = DecoderEngine(model)
        ids = PROMPTS[0] + PROMPTS[1]
        with torch.no_grad():
            expected = reference(torch.tensor([ids])).logits[0]
        got = engine.logits(engine.hidden(ids))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_greedy_decoding_equals_generate_with_left_padding_and_eos(tiny: torch.nn.Module) -> None:
    ids, attn = left_pad(PROMPTS, pad_id=0)
    for name, model in _models(tiny).items():
        reference = copy.deepcopy(model)
        engine = DecoderEngine(model)

        def hf(eos: int, ref: torch.nn.Module = reference, n: int = 12) -> torch.Tensor:
            with torch.no_grad():
                out = ref.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=n,
                                   pad_token_id=0, eos_token_id=eos)
            return out[:, ids.shape[1]:]

        free = hf(eos=299)
        # stop row 0 early: its 4th greedy token becomes the end-of-sequence token
        eos = int(free[0, 3])
        expected = hf(eos=eos)
        got = engine.generate(PROMPTS, 12, temperature=1.0, top_k=1, top_p=1.0, eos_ids={eos}, pad_id=0)
        width = expected.shape[1]  # generate stops when every row has ended
        assert torch.equal(got[:, :width], expected), name
        assert (got[:, width:] == 0).all() or width == 12, name


def test_min_new_tokens_suppresses_the_end_token(tiny: torch.nn.Module) -> None:
    engine = DecoderEngine(copy.deepcopy(tiny))
    first = engine.generate(PROMPTS, 1, temperature=1.0, top_k=1, top_p=1.0, eos_ids={299}, pad_id=0)
    eos = int(first[0, 0])  # the token greedy decoding picks first for row 0
    stopped = engine.generate(PROMPTS, 5, temperature=1.0, top_k=1, top_p=1.0, eos_ids={eos}, pad_id=0)
    assert int(stopped[0, 0]) == eos and (stopped[0, 1:] == 0).all()
    held = engine.generate(PROMPTS, 5, temperature=1.0, top_k=1, top_p=1.0, eos_ids={eos}, pad_id=0,
                           min_new_tokens=3)
    assert eos not in held[0, :3].tolist()


def test_sampling_is_seeded_and_stays_in_the_filtered_support(tiny: torch.nn.Module) -> None:
    engine = DecoderEngine(copy.deepcopy(tiny))

    def draw(seed: int, **kw: float) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return engine.generate(PROMPTS, 8, eos_ids={299}, pad_id=0, generator=gen, **kw)

    settings = {"temperature": 1.3, "top_k": 0, "top_p": 1.0}
    assert torch.equal(draw(1, **settings), draw(1, **settings))
    assert not torch.equal(draw(1, **settings), draw(2, **settings))
    # top_k=2: every drawn token is one of the two most likely after the prefix actually drawn
    out = draw(3, temperature=1.0, top_k=2, top_p=1.0)
    for row, prompt in enumerate(PROMPTS):
        seq = prompt + out[row].tolist()
        logits = engine.logits(engine.hidden(seq))
        for j in range(out.shape[1]):
            top2 = torch.topk(logits[len(prompt) - 1 + j], 2).indices.tolist()
            assert out[row, j].item() in top2


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (1.1, 20, 0.95), (0.7, 5, 0.5),
                                                     (1.0, 0, 0.9), (2.0, 1, 0.3)])
def test_filter_logits_equals_the_transformers_warpers(temperature: float, top_k: int, top_p: float) -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 500) * 3
    logits[0, :4] = 5.0  # ties at the top-k boundary
    expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k > 0:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    got = filter_logits(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    torch.testing.assert_close(got.softmax(-1), expected.softmax(-1))


def test_unsupported_models_are_named_and_lora_must_be_merged(tiny: torch.nn.Module) -> None:
    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2,
                                                                 vocab_size=100))
    assert "gpt2" in supports(gpt2)
    with pytest.raises(ValueError, match="gpt2"):
        DecoderEngine(gpt2)
    from opsd_core.config import LoraConfig
    from opsd_core.models.lora import wrap_lora

    wrapped = wrap_lora(copy.deepcopy(tiny), LoraConfig())
    assert supports(wrapped) is None  # the architecture is fine ...
    with pytest.raises(ValueError, match="merge"):
        DecoderEngine(wrapped)  # ... but the adapter must be folded in first


def test_sampler_falls_back_to_generate_for_unsupported_models() -> None:
    from opsd_core.backends.sampler import PolicySampler

    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2,
                                                                 vocab_size=100))
    messages: list[str] = []
    sampler = PolicySampler(gpt2, torch.float32, log=messages.append)
    assert sampler.module() is gpt2 and "transformers generate" in messages[0]


@pytest.mark.parametrize("case", ["fp32", "bf16-ties", "all-tied", "no-top-k"])
def test_candidate_draw_has_the_full_vocabulary_distribution(case: str) -> None:
    """Top-p and the draw over the top-k candidates give exactly the distribution of the full filter."""
    torch.manual_seed(1)
    logits = torch.randn(5, 3000) * 3
    top_k = 0 if case == "no-top-k" else 20
    if case == "bf16-ties":
        logits = logits.bfloat16().float()  # coarse values: ties at the k-th value are common
    if case == "all-tied":
        logits[:, :200] = 9.0  # 200 tokens tied at the top: more than the candidate list holds
    probs, ids = candidates(logits, 1.1, top_k, 0.95)
    full = probs if ids is None else torch.zeros_like(logits).scatter(1, ids, probs)
    expected = filter_logits(logits, 1.1, top_k, 0.95).softmax(dim=-1)
    torch.testing.assert_close(full, expected)
    assert (ids is None) == (case in ("all-tied", "no-top-k"))
    if case == "bf16-ties":
        kth = torch.topk(logits, top_k).values[:, -1:]
        assert bool(((logits >= kth).sum(dim=-1) > top_k).any())  # the case really has ties
