"""oneDNN-packed frozen linears compute what F.linear computes, forward and backward, and never go stale."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from opsd_core.algorithm.rollout import Rollouts, completion_mask_from_ids
from opsd_core.algorithm.scoring import build_scoring_batch, completion_hidden
from opsd_core.algorithm.trainer import Problem
from opsd_core.backends.capabilities import probe
from opsd_core.backends.engine import DecoderEngine
from opsd_core.backends.fused_lora import installed
from opsd_core.backends.packs import LinearPacks, PackedLinear, for_plan
from opsd_core.backends.plan import make_plan
from opsd_core.config import Params
from opsd_core.models.lora import wrap_lora
from opsd_core.models.sources import load_model_and_tokenizer
from opsd_core.stages.train import build_trainer
from tests.support import random_model

ROOT = Path(__file__).resolve().parents[1]
# without oneDNN the plan turns packs off: tests/test_capabilities.py trains that fallback on every machine
pytestmark = pytest.mark.skipif(not probe().onednn_fp32, reason="this torch build or CPU has no oneDNN packed linear")
# bf16 packs need AVX-512 BW/VL/DQ or AVX-NE-CONVERT; where they are missing, bf16 weights keep F.linear
# (test_bf16_weights_keep_f_linear_where_onednn_cannot_pack_them, here, and the simulated AVX2 runs in
# tests/test_capabilities.py cover that on every machine)
needs_bf16_packs = pytest.mark.skipif(not probe().onednn_bf16, reason="oneDNN cannot pack bf16 weights on this CPU")
BF16_PACKS = (torch.float32, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16_packs)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear_and_its_input_gradient(dtype: torch.dtype, bias: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 80, generator=gen).to(dtype)
    b = torch.randn(96, generator=gen).to(dtype) if bias else None
    x = torch.randn(3, 5, 80, generator=gen).to(dtype)  # leading dims kept
    layer = PackedLinear(w, b)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.0, "rtol": 0.0}
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, w, b), **tol)
    g = torch.randn(3, 5, 96, generator=gen).to(dtype)
    got_x = x.clone().requires_grad_(True)
    (layer(got_x) * g).sum().backward()
    ref_x = x.clone().requires_grad_(True)
    (F.linear(ref_x, w, b) * g).sum().backward()
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(got_x.grad, ref_x.grad, **tol)


@needs_bf16_packs
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_can_compute_in_bfloat16_over_fp32_weights(bias: bool) -> None:
    """compute=bf16: the product of the bf16-rounded operands, returned in the input's dtype (autocast's linear)."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(96, 80, generator=gen)
    b = torch.randn(96, generator=gen) if bias else None
    x = torch.randn(3, 5, 80, generator=gen)
    layer = PackedLinear(w, b, compute=torch.bfloat16)
    assert layer.weight.dtype == torch.float32 and layer.matrix.dtype == torch.bfloat16
    with torch.no_grad():
        got = layer(x)
        ref = F.linear(x.bfloat16(), w.bfloat16(), None if b is None else b.bfloat16()).float()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=0.0, rtol=0.0)
    assert not torch.allclose(got, F.linear(x, w, b), atol=1e-4, rtol=0.0)  # really not the fp32 product
    g = torch.randn(3, 5, 96, generator=gen)
    got_x = x.clone().requires_grad_(True)
    (layer(got_x) * g).sum().backward()
    assert got_x.grad.dtype == torch.float32
    torch.testing.assert_close(got_x.grad, (g.bfloat16() @ w.bfloat16()).float(), atol=0.0, rtol=0.0)


def test_packs_are_rebuilt_when_the_weight_changes() -> None:
    lin = torch.nn.Linear(64, 48).requires_grad_(False)
    packs = LinearPacks(force=True)
    x = torch.randn(4, 64)
    first = packs.get(lin)
    assert first is not None and packs.get(lin) is first  # kept while the weight stays
    with torch.no_grad():
        lin.weight.mul_(2.0)  # in place: the version counter moves
    second = packs.get(lin)
    assert second is not first
    torch.testing.assert_close(second(x), lin(x), atol=1e-5, rtol=1e-5)
    lin.weight.data = torch.randn(48, 64)  # swapped storage (how the EMA teacher swaps weights)
    torch.testing.assert_close(packs.get(lin)(x), lin(x), atol=1e-5, rtol=1e-5)
    # trainable or small layers are not packed unless forced
    assert LinearPacks().get(lin) is None
    assert LinearPacks(force=True).get(torch.nn.Linear(64, 48)) is None
    # a compute dtype oneDNN cannot pack is refused, never attempted
    with pytest.raises(ValueError, match="not packable"):
        LinearPacks(compute=torch.bfloat16, dtypes=(torch.float32,))


@needs_bf16_packs
def test_a_compute_dtype_packs_every_frozen_layer() -> None:
    lin = torch.nn.Linear(64, 48).requires_grad_(False)
    # with a compute dtype every frozen layer is packed, however small: all its products run in that dtype
    assert LinearPacks(compute=torch.bfloat16, dtypes=BF16_PACKS).get(lin) is not None


def test_bf16_weights_keep_f_linear_where_onednn_cannot_pack_them(smoke: Params) -> None:
    """Packs for an AVX2 CPU (fp32 only): a bf16 model's linears are not packed, and its engine computes
    exactly what the plain engine computes (the sampler's bf16 copy on such a CPU)."""
    fp32_only = LinearPacks(force=True, dtypes=(torch.float32,))
    assert fp32_only.get(torch.nn.Linear(64, 48, dtype=torch.bfloat16).requires_grad_(False)) is None
    assert fp32_only.pack(torch.randn(48, 64, dtype=torch.bfloat16), None) is None
    assert fp32_only.pack(torch.randn(48, 64), None) is not None
    model, _ = load_model_and_tokenizer(smoke.model, ROOT)
    model = model.to(torch.bfloat16).eval().requires_grad_(False)
    fast = DecoderEngine(copy.deepcopy(model), packs=fp32_only)
    assert fast.layers[0].qkv.fast is None
    plain = DecoderEngine(copy.deepcopy(model))
    ids = list(range(40, 60))
    assert torch.equal(fast.logits(fast.hidden(ids)), plain.logits(plain.hidden(ids)))


def test_packs_follow_the_plan(smoke: Params) -> None:
    plan = make_plan(smoke, probe())
    assert plan.packs == "large"  # auto, on a CPU with oneDNN (this module is skipped without it)
    packs = for_plan(plan)
    assert packs is not None and not packs.force and packs.compute is None
    assert packs.dtypes == ((torch.float32, torch.bfloat16) if probe().onednn_bf16 else (torch.float32,))
    on = smoke.model_copy(deep=True)
    on.train.packed_weights = "on"
    assert for_plan(make_plan(on, probe())).force
    off = smoke.model_copy(deep=True)
    off.train.packed_weights = "off"
    assert for_plan(make_plan(off, probe())) is None
    if probe().onednn_bf16:
        fast = smoke.model_copy(deep=True)
        fast.train.frozen_dtype = "bfloat16"
        plan = make_plan(fast, probe())
        assert for_plan(plan).compute is torch.bfloat16
        assert for_plan(plan, frozen_dtype=False).compute is None  # the sampler's copy keeps its own dtype


def _tok_model(smoke: Params, dropout: float = 0.0) -> tuple[torch.nn.Module, object]:
    model, tok = load_model_and_tokenizer(smoke.model, ROOT)
    torch.manual_seed(0)
    model = wrap_lora(model, smoke.lora.model_copy(update={"dropout": dropout}))
    with torch.no_grad():  # B starts at zero: make the adapter matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model, tok


def _graph_nodes(t: torch.Tensor) -> set[str]:
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_installed_packs_leave_the_student_pass_and_its_gradient_unchanged(smoke: Params, dropout: float) -> None:
    """Plain LoRA layers run as one fused node over the packed base; others (here: with dropout, in eval
    mode so both runs agree) keep peft's forward over the packed base. Values and gradients are unchanged."""
    model, tok = _tok_model(smoke, dropout)
    model.train(dropout == 0.0)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(10, 200, (2, 7), generator=gen)
    batch = build_scoring_batch([[5, 6, 7, 8, 9, 10], [11, 12, 13]], ids, torch.ones_like(ids, dtype=torch.bool),
                                tok.pad_token_id)
    results = []
    packs = LinearPacks(force=True)
    for use in (False, True):
        model.zero_grad(set_to_none=True)
        if use:
            with installed(model, packs):
                hidden = completion_hidden(model, batch)
            nodes = _graph_nodes(hidden)
        else:
            hidden = completion_hidden(model, batch)
        hidden.pow(2).mean().backward()
        results.append((hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (h0, g0), (h1, g1) = results
    assert ("_LoraLinearFnBackward" in nodes) == (dropout == 0.0), nodes
    assert "_PackedLinearFnBackward" in nodes or dropout == 0.0
    assert all("forward" not in m.__dict__ for m in model.modules()), "patched forwards must be removed"
    torch.testing.assert_close(h1, h0, atol=1e-5, rtol=1e-5)
    assert g0.keys() == g1.keys() and any(g.abs().sum() > 0 for g in g0.values())
    assert any("lora_A" in n for n in g0) and any("lora_B" in n for n in g0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("kind", ["tiny-llama", "qwen2"])
def test_engine_with_packs_matches_the_plain_engine_after_a_weight_rewrite(smoke: Params, kind: str) -> None:
    """Packed q/k/v (with qwen2's biases) and gate/up, per-layer packs and the head, before and after a sync."""
    if kind == "qwen2":
        model = random_model("qwen2")
    else:
        model, _ = load_model_and_tokenizer(smoke.model, ROOT)
    model = model.eval().requires_grad_(False)
    fast_model = copy.deepcopy(model)
    fast = DecoderEngine(fast_model, packs=LinearPacks(force=True))
    ids = list(range(40, 60))
    greedy = {"max_new_tokens": 6, "temperature": 1.0, "top_k": 1, "top_p": 1.0, "eos_ids": set(), "pad_id": 0}
    for _ in range(2):
        plain = DecoderEngine(copy.deepcopy(model))
        torch.testing.assert_close(fast.logits(fast.hidden(ids)), plain.logits(plain.hidden(ids)),
                                   atol=1e-4, rtol=1e-4)
        assert torch.equal(fast.generate([ids, ids[:7]], **greedy), plain.generate([ids, ids[:7]], **greedy))
        with torch.no_grad():  # the sampler's sync: in-place writes (through the packed matrices' views)
            for p_fast, p_ref in zip(fast_model.parameters(), model.parameters(), strict=True):
                p_ref.mul_(1.1)
                p_fast.copy_(p_ref)
        fast.refresh()


@needs_bf16_packs
def test_student_pass_with_bfloat16_packs_is_autocast_for_the_frozen_layers(smoke: Params) -> None:
    """With compute=bf16, the student's pass (fused LoRA nodes) tracks a reference in which only the
    frozen base products run in bf16 (LoRA in fp32), and is much closer to it than the fp32 pass is."""
    model, tok = _tok_model(smoke)
    model.train()
    ids = torch.randint(10, 200, (2, 7), generator=torch.Generator().manual_seed(3))
    batch = build_scoring_batch([[5, 6, 7, 8, 9, 10], [11, 12, 13]], ids, torch.ones_like(ids, dtype=torch.bool),
                                tok.pad_token_id)

    def run(packs: LinearPacks | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        if packs is None:
            hidden = completion_hidden(model, batch)
        else:
            with installed(model, packs):
                hidden = completion_hidden(model, batch)
        hidden.pow(2).mean().backward()
        return hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    bases = [m.base_layer for m in model.modules() if hasattr(m, "lora_A")]
    for base in bases:  # the reference: autocast's rule for the frozen linears only
        base.forward = lambda x, m=base: F.linear(x.bfloat16(), m.weight.bfloat16(),
                                                  None if m.bias is None else m.bias.bfloat16()).to(x.dtype)
    ref = run(None)
    for base in bases:
        del base.forward
    fp32 = run(LinearPacks(force=True))
    bf16 = run(LinearPacks(compute=torch.bfloat16, dtypes=BF16_PACKS))  # no force: with a compute dtype every size is packed

    def err(a: tuple, b: tuple) -> list[float]:
        out = [float((a[0] - b[0]).abs().max() / b[0].abs().max())]
        out += [float((a[1][n] - b[1][n]).abs().max() / b[1][n].abs().max()) for n in b[1]]
        return out

    near, far = max(err(bf16, ref)), max(err(fp32, ref))
    assert near < 1e-4 < far, (near, far)  # measured: 2.5e-7 vs 1.8e-2


def _problems(tok: object) -> list[Problem]:
    from opsd_core.algorithm.prompts import student_prompt_ids, teacher_prompt_ids

    rows = [("Tom has 3 apples and buys 4 more. How many?", "3 + 4 = 7\n#### 7"), ("Sam ran 2 km.", "#### 2")]
    return [Problem(str(i), student_prompt_ids(tok, p), teacher_prompt_ids(tok, p, s)) for i, (p, s) in enumerate(rows)]


def test_training_with_packed_weights_follows_the_unpacked_run(smoke: Params, tmp_path: Path) -> None:
    """The whole step with every frozen linear packed (student, fixed teacher, sampler) tracks F.linear;
    with train.frozen_dtype=bfloat16 it stays within bf16 rounding of it."""
    runs = {}
    for setting in ("off", "on", "bf16") if probe().onednn_bf16 else ("off", "on"):
        params = smoke.model_copy(deep=True)
        params.train.packed_weights = "off" if setting == "off" else "on"
        params.train.frozen_dtype = "bfloat16" if setting == "bf16" else None
        model, tok = _tok_model(params)
        trainer = build_trainer(params, model, tok, _problems(tok), torch.device("cpu"), tmp_path / setting,
                              log=lambda _m: None)
        assert (trainer.backend.packs is not None) == (setting != "off")
        if trainer.backend.packs is not None:
            assert trainer.backend.packs.compute == (torch.bfloat16 if setting == "bf16" else None)
            assert trainer.backend.sampler.engine.layers[0].qkv.packs.compute is None  # the sampler copy keeps its dtype
        ids = torch.randint(10, 200, (2, 6), generator=torch.Generator().manual_seed(0))
        mask, ended = completion_mask_from_ids(ids, {tok.eos_token_id})
        rollouts = Rollouts(ids, mask, ended, 1.0)
        kls = []
        for _ in range(2):
            kls.append(trainer.accumulate(trainer.problems, rollouts)["kl"])
            trainer.optimizer_step()
        engine = trainer.backend.sampler.module()
        runs[setting] = (kls, engine.logits(engine.hidden(trainer.problems[0].student_ids)))
    assert runs["on"][0][0] > 0
    torch.testing.assert_close(torch.tensor(runs["on"][0]), torch.tensor(runs["off"][0]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(runs["on"][1], runs["off"][1], atol=1e-4, rtol=1e-4)
    if "bf16" not in runs:
        return  # oneDNN cannot pack bf16 here: train.frozen_dtype=bfloat16 is an error (tests/test_plan.py)
    kl16, kl32 = torch.tensor(runs["bf16"][0]), torch.tensor(runs["off"][0])
    torch.testing.assert_close(kl16, kl32, atol=0.0, rtol=0.05)
    assert not torch.allclose(kl16, kl32, atol=0.0, rtol=1e-5)  # the frozen products did run in bf16
