"""The sampler paths a back-end can choose: the opsd engine, transformers ``generate``, and ``generate``
over transformers' static KV cache (the GPU default, compiled there; eager on a CPU, which is what runs
here). With per-row noise every path must draw the same rollouts from the same weights."""

from __future__ import annotations

import copy

import pytest
import torch

from opsd_core.algorithm.rollout import eos_token_ids, left_pad, sample
from opsd_core.backends.base import Backend
from opsd_core.backends.plan import make_plan
from opsd_core.backends.sampler import PolicySampler
from opsd_core.config import Params
from tests.support import AVX2, H100, load_policy, toy_problems


def test_left_pad_rounds_the_width_up_to_the_bucket() -> None:
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0, multiple=4)
    assert ids.tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]] and mask.sum(dim=1).tolist() == [3, 1]
    ids, mask = left_pad([[5, 6, 7, 1, 2]], pad_id=0, multiple=4)
    assert ids.shape == (1, 8) and mask[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]


@pytest.mark.parametrize(("caps", "setting", "expected", "why"), [
    (AVX2, "auto", "engine", "auto: opsd engine on a CPU"),
    (H100, "auto", "static", "auto: transformers' static KV cache, compiled, on CUDA"),
    (H100, "engine", "engine", "set"),
    (AVX2, "static", "static", "set"),
])
def test_the_plan_resolves_the_sampler_for_the_device(smoke: Params, caps, setting: str,  # noqa: F811
                                                        expected: str, why: str) -> None:
    params = smoke.model_copy(deep=True)
    params.opsd.sampling.backend = setting
    plan = make_plan(params, caps)
    assert plan.sampler == expected
    # the reason names the rule that chose: the device's default under auto (the reason, then its figures),
    # the setting otherwise
    if setting == "auto":
        assert plan.why["sampler"].startswith(why + " (")
    else:
        assert plan.why["sampler"] == why


def test_static_cache_draws_the_rollouts_generate_and_the_engine_draw(smoke: Params) -> None:  # noqa: F811
    model, tok = load_policy(smoke)
    prompts = [p.student_ids for p in toy_problems(tok)]
    assert len({len(p) for p in prompts}) > 1  # really different prompt lengths: padding matters
    cfg = smoke.opsd.sampling.model_copy(update={"max_new_tokens": 12})
    eos, seeds = eos_token_ids(model, tok), [11, 12, 13, 14][: len(prompts)]
    draws = {}
    for kind in ("engine", "generate", "static"):
        sampler = PolicySampler(model, torch.float32, kind)
        out = sample(sampler.module(), prompts, cfg, tok.pad_token_id, eos, seeds, torch.device("cpu"),
                     options=sampler.generate_options)
        draws[kind] = out
    assert draws["static"].completion_ids.shape == draws["generate"].completion_ids.shape
    for kind in ("engine", "static"):
        mask = draws[kind].completion_mask
        assert torch.equal(mask, draws["generate"].completion_mask), kind
        assert torch.equal(draws[kind].completion_ids[mask.bool()],
                           draws["generate"].completion_ids[mask.bool()]), kind
    assert draws["static"].num_tokens > 0


def test_the_static_sampler_decodes_a_merged_copy_and_follows_training(smoke: Params) -> None:  # noqa: F811
    model, tok = load_policy(smoke)
    backend = Backend(model, torch.float32, "static")
    assert backend.sampler.copy is not None and backend.sampler.engine is None
    assert backend.describe_sampler() == "transformers generate, static cache on a merged float32 copy"
    assert backend.generate_options["cache_implementation"] == "static"
    before = copy.deepcopy(backend.sampling_module().state_dict())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    after = backend.sampling_module().state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # synced from the policy's new weights
