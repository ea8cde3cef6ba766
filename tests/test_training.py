"""OPSD training on the tiny model: alignment, teachers, learning, checkpoint/resume."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from opsd_core.algorithm.optim import build_optimizer, lr_factor
from opsd_core.algorithm.prompts import (
    ANSWER_INSTRUCTION,
    SOLUTION_END,
    TEACHER_INSTRUCTION,
    student_prompt_ids,
    teacher_prompt_ids,
)
from opsd_core.algorithm.rollout import Rollouts, completion_mask_from_ids, eos_token_ids
from opsd_core.algorithm.scoring import ScoringBatch, build_scoring_batch, completion_hidden, lm_head
from opsd_core.algorithm.teacher import EmaTeacher, FixedTeacher, LiveTeacher
from opsd_core.algorithm.trainer import (
    OPSDTrainer,
    TrainingError,
    load_problems,
    shuffled_partners,
    step_indices,
)
from opsd_core.backends.base import Backend
from opsd_core.backends.capabilities import probe
from opsd_core.backends.cpu import CpuBackend
from opsd_core.backends.plan import make_plan
from opsd_core.config import ConfigError, Params, TrainConfig, load_params
from opsd_core.models.lora import effective_weights, wrap_lora
from opsd_core.models.sources import load_model_and_tokenizer, resolve_base_dir
from opsd_core.stages.train import build_backend, build_trainer, save_candidate
from tests.support import fixed_rollouts, load_policy, toy_problems, train_steps

ROOT = Path(__file__).resolve().parents[1]


def test_student_and_teacher_score_the_same_tokens_at_the_same_positions(smoke: Params) -> None:
    """Batched, left-padded scoring equals scoring each row alone without any padding."""
    model, tok = load_policy(smoke)
    model.eval()
    problems = toy_problems(tok)
    rollouts = fixed_rollouts(tok, len(problems))
    head = lm_head(model).weight
    for prompts in ([p.student_ids for p in problems], [p.teacher_ids for p in problems]):
        assert len({len(p) for p in prompts}) > 1  # really different prompt lengths
        batch = build_scoring_batch(prompts, rollouts.completion_ids, rollouts.completion_mask, tok.pad_token_id)
        assert torch.equal(batch.completion_ids(), rollouts.completion_ids)
        with torch.no_grad():
            batched = completion_hidden(model, batch) @ head.T
            for i, prompt in enumerate(prompts):
                n = int(rollouts.completion_mask[i].sum())
                ids = torch.tensor([prompt + rollouts.completion_ids[i, :n].tolist()])
                alone = model(input_ids=ids).logits[0, len(prompt) - 1:len(prompt) - 1 + n]
                torch.testing.assert_close(batched[i, :n], alone, atol=1e-4, rtol=1e-4)


def _trainer(params: Params, model: torch.nn.Module, tok: object, tmp: Path) -> OPSDTrainer:
    return build_trainer(params, model, tok, toy_problems(tok), torch.device("cpu"), tmp / "run",
                       log=lambda _m: None)


def _assert_close_where_valid(got: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor, tol: float) -> None:
    """Hidden states [B, L, H] agree at the valid completion positions (the only ones the loss reads)."""
    assert got.shape == expected.shape
    torch.testing.assert_close(got[mask], expected[mask], atol=tol, rtol=tol)


def _teacher_batch(trainer: OPSDTrainer, rollouts: Rollouts, tok: object) -> ScoringBatch:
    return build_scoring_batch([p.teacher_ids for p in trainer.problems], rollouts.completion_ids,
                               rollouts.completion_mask, tok.pad_token_id)


def test_training_lowers_the_divergence_on_a_fixed_batch(smoke: Params, tmp_path: Path) -> None:
    model, tok = load_policy(smoke)
    trainer = _trainer(smoke, model, tok, tmp_path)
    batch = trainer.problems
    rollouts = fixed_rollouts(tok, len(batch), length=8)
    losses = []
    for _ in range(6):
        losses.append(trainer.accumulate(batch, rollouts)["kl"])
        trainer.optimizer_step()
    assert losses[0] > 0
    assert losses[-1] < 0.7 * losses[0], losses


def test_micro_batch_grouping_and_trimming_leave_the_gradient_unchanged(smoke: Params, tmp_path: Path) -> None:
    """accumulate sorts rows by length and cuts each micro-batch to its longest completion: the step's
    gradient equals one full-width pass over all rows in their original order."""
    from opsd_core.algorithm.losses import chunked_divergence_loss

    gen = torch.Generator().manual_seed(1)
    tok = load_model_and_tokenizer(smoke.model, ROOT)[1]
    ids = torch.randint(10, 200, (4, 8), generator=gen)
    for row, end in ((0, 1), (1, 4), (3, 6)):  # row 2 never ends: the widest row
        ids[row, end] = tok.eos_token_id
    mask, ended = completion_mask_from_ids(ids, {tok.eos_token_id})
    rollouts = Rollouts(ids.masked_fill(~mask, tok.pad_token_id), mask, ended, 1.0)

    grads = {}
    for mb in (1, 2, 4):
        params = smoke.model_copy(deep=True)
        params.train.micro_batch_size = mb
        model, _ = load_policy(params)
        trainer = _trainer(params, model, tok, tmp_path / str(mb))
        trainer.accumulate(trainer.problems, rollouts)
        grads[mb] = {n: p.grad.clone() for n, p in trainer.trainable.items()}

    # reference: every row, original order, the full completion block, one pass
    model, _ = load_policy(smoke)
    trainer = _trainer(smoke, model, tok, tmp_path / "ref")
    s_batch = build_scoring_batch([p.student_ids for p in trainer.problems], rollouts.completion_ids,
                                  rollouts.completion_mask, tok.pad_token_id)
    with torch.no_grad(), model.disable_adapter():
        t_hidden = completion_hidden(model, _teacher_batch(trainer, rollouts, tok))
    loss, _ = chunked_divergence_loss(completion_hidden(model, s_batch), t_hidden, lm_head(model).weight,
                                      rollouts.completion_mask, trainer.spec, denom=rollouts.num_tokens)
    loss.backward()
    for name, p in trainer.trainable.items():
        for mb in (1, 2, 4):
            torch.testing.assert_close(grads[mb][name], p.grad, atol=1e-6, rtol=1e-4)
    assert any(p.grad.abs().sum() > 0 for p in trainer.trainable.values())


def test_fixed_teacher_stays_the_base_model_after_training(smoke: Params, tmp_path: Path) -> None:
    base, tok = load_model_and_tokenizer(smoke.model, ROOT)
    base.eval()
    model, _ = load_policy(smoke)
    trainer = _trainer(smoke, model, tok, tmp_path)
    assert isinstance(trainer.teacher, FixedTeacher)
    rollouts = fixed_rollouts(tok, 4)
    train_steps(trainer, rollouts, 3)
    batch = _teacher_batch(trainer, rollouts, tok)
    with torch.no_grad():
        expected = completion_hidden(base, batch)
        student = completion_hidden(model, batch)
    # scored by the engine over the policy's own base weights (adapter ignored, no copy, no padding)
    assert trainer.teacher.describe().startswith("opsd engine")
    assert trainer.teacher.lm_head_weight().data_ptr() == lm_head(model).weight.data_ptr()  # no copy
    _assert_close_where_valid(trainer.teacher.hidden(batch), expected, rollouts.completion_mask, 1e-5)
    assert not torch.allclose(student, expected)  # the student did move


def test_fixed_teacher_padded_batch_is_the_base_model(smoke: Params, tmp_path: Path) -> None:
    """The GPU choice (one padded batch, adapter disabled) scores what the per-row engine scores."""
    base, tok = load_model_and_tokenizer(smoke.model, ROOT)
    base.eval()
    model, _ = load_policy(smoke)
    padded = FixedTeacher(model)  # no back-end: the portable padded pass
    assert padded.describe() == "padded batch through the model"
    trainer = _trainer(smoke, model, tok, tmp_path)
    rollouts = fixed_rollouts(tok, 4)
    train_steps(trainer, rollouts, 2)
    batch = _teacher_batch(trainer, rollouts, tok)
    with torch.no_grad():
        expected = completion_hidden(base, batch)
    _assert_close_where_valid(padded.hidden(batch), expected, rollouts.completion_mask, 1e-5)
    _assert_close_where_valid(padded.hidden(batch), trainer.teacher.hidden(batch), rollouts.completion_mask, 1e-5)
    assert model.training  # the padded pass restores the train mode it found


def test_per_row_scoring_is_the_cpu_backends_choice(smoke: Params) -> None:
    model, _ = load_policy(smoke)
    plan = make_plan(smoke, probe())
    cpu = build_backend(smoke, model, plan, torch.device("cpu"), lambda _m: None)
    portable = build_backend(smoke, model, plan, torch.device("meta"), lambda _m: None)  # any other device
    assert isinstance(cpu, CpuBackend) and type(portable) is Backend
    for backend, expected in ((cpu, "opsd engine, one unpadded row at a time"), (portable, "padded batch")):
        assert FixedTeacher(model, backend=backend).describe().startswith(expected)
        assert EmaTeacher(model, 0.9, backend=backend).describe().startswith(expected)
    assert LiveTeacher(model).describe().startswith("padded batch")  # its weights change under it


def test_fixed_teacher_for_full_finetuning_is_a_frozen_copy(smoke: Params, tmp_path: Path) -> None:
    params = smoke.model_copy(deep=True)
    params.lora.enabled = False
    model, tok = load_policy(params, lora=False)
    initial = copy.deepcopy(model)
    trainer = _trainer(params, model, tok, tmp_path)
    rollouts = fixed_rollouts(tok, 4)
    train_steps(trainer, rollouts, 1)
    batch = _teacher_batch(trainer, rollouts, tok)
    with torch.no_grad():
        # the frozen copy is scored by the engine (unpadded): same values up to summation order
        _assert_close_where_valid(trainer.teacher.hidden(batch), completion_hidden(initial, batch),
                                  rollouts.completion_mask, 1e-5)
        assert not torch.allclose(completion_hidden(model, batch), completion_hidden(initial, batch))


def test_live_teacher_tracks_the_current_weights(smoke: Params, tmp_path: Path) -> None:
    params = smoke.model_copy(deep=True)
    params.opsd.teacher = "live"
    model, tok = load_policy(params)
    trainer = _trainer(params, model, tok, tmp_path)
    assert isinstance(trainer.teacher, LiveTeacher)
    rollouts = fixed_rollouts(tok, 4)
    batch = _teacher_batch(trainer, rollouts, tok)
    before = trainer.teacher.hidden(batch)
    train_steps(trainer, rollouts, 2)
    model.eval()
    with torch.no_grad():
        current = completion_hidden(model, batch)
    assert torch.equal(trainer.teacher.hidden(batch), current)
    assert not torch.allclose(before, current)


def test_ema_teacher_averages_the_merged_delta_and_survives_resume(smoke: Params, tmp_path: Path) -> None:
    params = smoke.model_copy(deep=True)
    params.opsd.teacher = "ema"
    params.opsd.ema_decay = 0.5
    model, tok = load_policy(params)
    trainer = _trainer(params, model, tok, tmp_path)
    assert isinstance(trainer.teacher, EmaTeacher)
    rollouts = fixed_rollouts(tok, 4)
    name = next(iter(trainer.teacher.ema))
    w0 = trainer.teacher.ema[name].clone()
    train_steps(trainer, rollouts, 1)
    effective = effective_weights(model)[name]
    torch.testing.assert_close(trainer.teacher.ema[name], 0.5 * w0 + 0.5 * effective)
    assert not torch.equal(trainer.teacher.ema[name], w0)
    trainer.state.step = 1
    trainer.save_checkpoint()

    model2, _ = load_policy(params)
    resumed = _trainer(params, model2, tok, tmp_path)
    assert resumed.resume()
    for key, value in trainer.teacher.ema.items():
        assert torch.equal(resumed.teacher.ema[key], value)
    batch = _teacher_batch(trainer, rollouts, tok)
    assert torch.equal(resumed.teacher.hidden(batch), trainer.teacher.hidden(batch))
    # the engine scores the averaged weights: the same as transformers on a copy whose base layers hold
    # them, adapter off
    swapped = copy.deepcopy(model).eval()
    with torch.no_grad():
        for key, value in trainer.teacher.ema.items():
            swapped.get_submodule(key).base_layer.weight.copy_(value)
        with swapped.disable_adapter():
            expected = completion_hidden(swapped, batch)
    _assert_close_where_valid(trainer.teacher.hidden(batch), expected, rollouts.completion_mask, 1e-5)
    with torch.no_grad():
        assert not torch.allclose(completion_hidden(model, batch), expected)  # not the current weights


def test_non_finite_loss_stops_training(smoke: Params, tmp_path: Path) -> None:
    model, tok = load_policy(smoke)
    trainer = _trainer(smoke, model, tok, tmp_path)
    with torch.no_grad():
        lm_head(model).weight[5, 0] = float("nan")
    with pytest.raises(TrainingError, match="non-finite"):
        trainer.accumulate(trainer.problems, fixed_rollouts(tok, 4))


def test_step_indices_cover_each_epoch_once() -> None:
    seen = [i for s in range(5) for i in step_indices(s, 2, 10, seed=3)]
    assert sorted(seen) == list(range(10))
    assert step_indices(7, 4, 10, 3) == step_indices(7, 4, 10, 3)


def test_eos_masking_keeps_the_end_token_and_drops_what_follows() -> None:
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 6, 7, 8, 9]])
    mask, ended = completion_mask_from_ids(ids, {2})
    assert mask.tolist() == [[True, True, True, False, False], [True] * 5]
    assert ended.tolist() == [True, False]


def test_load_problems_tokenizes_both_contexts(smoke: Params, tmp_path: Path) -> None:
    _, tok = load_model_and_tokenizer(smoke.model, ROOT)
    path = tmp_path / "train.jsonl"
    path.write_text('{"id": "a", "problem": "1+1?", "solution": "#### 2", "answer": "2"}\n')
    (problem,) = load_problems(path, tok)
    assert problem.id == "a"
    assert problem.student_ids == student_prompt_ids(tok, "1+1?")
    assert problem.teacher_ids == teacher_prompt_ids(tok, "1+1?", "#### 2")
    assert len(problem.teacher_ids) > len(problem.student_ids)
    # opsd.teacher_instruction replaces the built-in instruction; "" leaves none
    (plain,) = load_problems(path, tok, instruction="Use it.")
    (bare,) = load_problems(path, tok, instruction="")
    text = tok.decode(plain.teacher_ids)
    assert "Use it.\n\n" + ANSWER_INSTRUCTION in text and TEACHER_INSTRUCTION not in text
    assert TEACHER_INSTRUCTION in tok.decode(problem.teacher_ids)
    assert SOLUTION_END + "\n\n" + ANSWER_INSTRUCTION in tok.decode(bare.teacher_ids)
    assert plain.student_ids == bare.student_ids == problem.student_ids


def _context_rows(path: Path, n: int) -> list[tuple[str, str]]:
    rows = [(f"What is {i} plus {i}?", f"{i} + {i} = {2 * i}\n#### {2 * i}") for i in range(n)]
    path.write_text("".join(json.dumps({"id": str(i), "problem": p, "solution": s, "answer": str(2 * i)}) + "\n"
                            for i, (p, s) in enumerate(rows)))
    return rows


def test_teacher_context_shuffled_gives_each_problem_another_problems_solution(smoke: Params, tmp_path: Path) -> None:
    _, tok = load_model_and_tokenizer(smoke.model, ROOT)
    rows = _context_rows(tmp_path / "train.jsonl", 7)
    reference = load_problems(tmp_path / "train.jsonl", tok, context="reference", seed=3)
    shuffled = load_problems(tmp_path / "train.jsonl", tok, context="shuffled", seed=3)
    partners = shuffled_partners(7, 3)
    assert sorted(partners) == list(range(7)) and all(j != i for i, j in enumerate(partners))  # a derangement
    assert partners == shuffled_partners(7, 3) and partners != shuffled_partners(7, 4)  # seeded
    for i, (prob, ref) in enumerate(zip(shuffled, reference, strict=True)):
        problem, _ = rows[i]
        assert prob.student_ids == ref.student_ids  # only the teacher's context changes
        assert prob.teacher_ids == teacher_prompt_ids(tok, problem, rows[partners[i]][1])
        assert prob.teacher_ids != ref.teacher_ids
    none = load_problems(tmp_path / "train.jsonl", tok, context="none")
    assert all(p.teacher_ids == p.student_ids for p in none)


def test_teacher_context_none_with_the_fixed_teacher_leaves_the_base_unchanged(smoke: Params, tmp_path: Path) -> None:
    """No privileged context: the fixed teacher is the student at step 0, so the divergence is zero, the
    gradient is rounding noise (the teacher and student passes take different kernels) and the policy keeps
    the base model's predictions (the zero line of the control). Adam scales even that noise up to a
    fraction of the learning rate, so the weights are compared through the logits, not bit for bit."""
    model, tok = load_policy(smoke)
    _context_rows(tmp_path / "train.jsonl", 4)
    problems = load_problems(tmp_path / "train.jsonl", tok, context="none")
    params = smoke.model_copy(update={"opsd": smoke.opsd.model_copy(update={"teacher_context": "none"})})
    trainer = build_trainer(params, model, tok, problems, torch.device("cpu"), tmp_path / "run", log=lambda _m: None)
    probe = torch.tensor([problems[0].student_ids])

    def moved(policy: torch.nn.Module, step: Callable[[], dict[str, float]]) -> tuple[dict[str, float], float]:
        with torch.no_grad():
            before = policy(input_ids=probe).logits
        row = step()
        policy.eval()
        with torch.no_grad():
            return row, float((policy(input_ids=probe).logits - before).abs().max())

    row, none_moved = moved(model, lambda: trainer.step(0))
    assert row["kl"] == pytest.approx(0.0, abs=1e-7) and row["grad_norm"] < 1e-7
    assert none_moved < 0.02  # Adam-scaled rounding noise: 2e-4 on AVX-512, 2e-3 on AVX2 at smoke's lr 5e-3
    # the same step with the solution in the teacher's context learns: logits move far more
    model2, _ = load_policy(smoke)
    reference = load_problems(tmp_path / "train.jsonl", tok, context="reference")
    learner = build_trainer(smoke, model2, tok, reference, torch.device("cpu"), tmp_path / "run2", log=lambda _m: None)
    row, reference_moved = moved(model2, lambda: learner.step(0))
    assert row["kl"] > 1e-5 and row["grad_norm"] > 1e-4 and reference_moved > 30 * none_moved


def test_eos_token_ids_are_the_end_tokens_of_model_and_tokenizer(smoke: Params) -> None:
    model, tok = load_model_and_tokenizer(smoke.model, ROOT)
    im_end, endoftext = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert im_end != endoftext
    assert eos_token_ids(model, tok) == {im_end}
    model.generation_config.eos_token_id = [im_end, endoftext]  # a list, as Qwen3 and Llama 3 configs have
    assert eos_token_ids(model, tok) == {im_end, endoftext}
    model.generation_config.eos_token_id = None
    assert eos_token_ids(model, tok) == {im_end}  # the tokenizer's alone
    tok.eos_token = None
    assert tok.eos_token_id is None
    with pytest.raises(ValueError, match=r"^model and tokenizer define no end-of-sequence token$"):
        eos_token_ids(model, tok)


def test_sampler_copy_follows_the_trained_policy(smoke: Params, tmp_path: Path) -> None:
    """The merged sampling copy (LoRA folded in) computes what the policy computes, step after step."""
    from opsd_core.backends.sampler import PolicySampler

    model, tok = load_policy(smoke)
    trainer = _trainer(smoke, model, tok, tmp_path)
    # a wide dtype: differences are merge errors only
    sampler = PolicySampler(model, torch.float64, backend="generate")
    engine_sampler = PolicySampler(model, torch.float64)
    rollouts = fixed_rollouts(tok, 4)
    ids = torch.tensor([trainer.problems[0].student_ids])
    for _ in range(2):
        train_steps(trainer, rollouts, 1)
        model.eval()
        with torch.no_grad():
            expected = model(input_ids=ids).logits.double()
            got = sampler.module()(input_ids=ids).logits
            engine = engine_sampler.module()  # synced in place through the packed weights
            got_engine = engine.logits(engine.hidden(ids[0]))
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got_engine, expected[0], atol=1e-4, rtol=1e-4)
    assert PolicySampler(model, torch.float32, backend="generate").module() is model  # same dtype: no copy


def test_fixed_teacher_in_another_dtype_is_the_base_model(smoke: Params, tmp_path: Path) -> None:
    """teacher_dtype scores with a frozen base copy (LoRA removed) in that dtype, untouched by training."""
    base, tok = load_model_and_tokenizer(smoke.model, ROOT)
    base.eval()
    model, _ = load_policy(smoke)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # an adapter that already changes the outputs: the teacher's copy must drop it
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5, generator=gen)
    teacher = FixedTeacher(model, torch.float64)  # wide dtype: any difference is a wrong copy
    trainer = _trainer(smoke, model, tok, tmp_path)
    rollouts = fixed_rollouts(tok, 4)
    train_steps(trainer, rollouts, 2)
    batch = _teacher_batch(trainer, rollouts, tok)
    with torch.no_grad():
        expected = completion_hidden(base, batch).double()
    got = teacher.hidden(batch)
    assert got.dtype == torch.float64 and teacher.lm_head_weight().dtype == torch.float64
    _assert_close_where_valid(got, expected, rollouts.completion_mask, 1e-5)
    with torch.no_grad():  # the adapter does change the policy's outputs: the teacher scored without it
        assert not torch.allclose(completion_hidden(model, batch).double(), expected, atol=1e-3)


def test_effective_weights_equal_peft_merge(smoke: Params, tmp_path: Path) -> None:
    """W0 + s·B·A from the fused path equals what peft's own merge writes into the base layer."""
    model, tok = load_policy(smoke)
    train_steps(_trainer(smoke, model, tok, tmp_path), fixed_rollouts(tok, 4), 1)  # B != 0 after a step
    merged = copy.deepcopy(model).merge_and_unload()
    effective = effective_weights(model)
    assert effective
    for name, weight in effective.items():
        expected = merged.get_submodule(name.removeprefix("base_model.model.")).weight
        torch.testing.assert_close(weight, expected, atol=1e-6, rtol=1e-5)
        assert not torch.equal(weight, model.get_submodule(name).base_layer.weight)


def test_bf16_bases_merge_the_lora_delta_in_fp32(smoke: Params) -> None:
    """The gpu profile's bf16 weights with an early, small LoRA delta (rms ~1e-5 on weights of rms 2e-2,
    below bf16's resolution there): the merge is computed in fp32, so the EMA teacher averages the true
    effective weights (a bf16 merge kept ~7 % of the delta), and the sampler's bf16 copy keeps the delta apart
    from the base (tests/test_bf16_sampler.py: its logits move with it)."""
    from opsd_core.backends.sampler import PolicySampler

    model, _ = load_model_and_tokenizer(smoke.model, ROOT, dtype=torch.bfloat16)
    torch.manual_seed(0)
    model = wrap_lora(model, smoke.lora)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 2e-5)
    name, layer = next((n, m) for n, m in model.named_modules() if hasattr(m, "lora_A"))
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    w0 = layer.base_layer.weight
    delta = (s * (b.float() @ a.float())).detach()

    def err(w: torch.Tensor) -> float:  # relative error of the delta that ``w`` carries
        return float(((w.float() - w0.float()) - delta).norm() / delta.norm())

    merged = effective_weights(model)[name]
    assert merged.dtype == torch.float32 and err(merged) < 1e-3
    with torch.no_grad():
        assert err(torch.addmm(w0, b.to(torch.bfloat16), a.to(torch.bfloat16), alpha=s)) > 0.5  # the bf16 merge
    ema = EmaTeacher(model, decay=0.5)
    assert err(ema.ema[name]) < 1e-3
    sampler = PolicySampler(model, torch.bfloat16)  # a bf16 copy keeps the delta unmerged (issue 26)
    sampler.sync()
    unmerged = sampler.deltas[name]
    assert torch.equal(unmerged.weight[:, :w0.shape[1]], w0)  # the bf16 base as it is
    assert torch.equal(unmerged.weight[:, w0.shape[1]:], b.to(torch.bfloat16))
    assert torch.equal(unmerged.scaled_a, a.float() * s)


def test_bf16_precision_trains_fp32_adapters_with_fp32_moments_and_loss(smoke: Params, tmp_path: Path) -> None:
    """The gpu profile's precision (train.precision=bfloat16), built as `opsd train` builds it: the frozen
    base in bf16; the LoRA weights, their gradients, AdamW's moments and the loss in fp32."""
    from opsd_core.algorithm.losses import chunked_divergence_loss
    from opsd_core.stages.train import build_policy, execution_plan

    params = load_params(ROOT / "params.yaml", "smoke", [f"model.cache_dir={smoke.model.cache_dir}",
                                                          "train.precision=bfloat16"])
    model, tok, _ = build_policy(params, ROOT, execution_plan(params))
    frozen = [p for p in model.parameters() if not p.requires_grad]
    trained = [p for p in model.parameters() if p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert trained and all(p.dtype == torch.float32 for p in trained)
    trainer = build_trainer(params, model, tok, toy_problems(tok), torch.device("cpu"), tmp_path / "run",
                            log=lambda _m: None)
    rollouts = fixed_rollouts(tok, len(trainer.problems))
    batch = build_scoring_batch([p.student_ids for p in trainer.problems], rollouts.completion_ids,
                                rollouts.completion_mask, tok.pad_token_id)
    hidden = trainer.student_hidden(batch)
    assert hidden.dtype == torch.bfloat16
    loss, _ = chunked_divergence_loss(hidden, hidden.detach(), lm_head(model).weight, rollouts.completion_mask,
                                      trainer.spec)
    assert loss.dtype == torch.float32
    trainer.accumulate(trainer.problems, rollouts)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained)
    trainer.optimizer_step()
    moments = [t for state in trainer.optimizer.state.values() for k, t in state.items() if k.startswith("exp_avg")]
    assert len(moments) == 2 * len(trained) and all(t.dtype == torch.float32 for t in moments)


def test_step_samples_rollouts_and_moves_only_the_adapter(smoke: Params, tmp_path: Path) -> None:
    """One real optimizer step: rollouts sampled by the back-end, scored, one AdamW step on the adapter."""
    model, tok = load_policy(smoke)
    trainer = _trainer(smoke, model, tok, tmp_path / "a")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    first_lr = trainer.scheduler.get_last_lr()[0]
    assert first_lr == smoke.train.lr * lr_factor(0, smoke.train) == smoke.train.lr  # warm-up of one step
    row = trainer.step(0)
    assert row["step"] == 1
    assert math.isfinite(row["loss"]) and row["loss"] > 0
    assert 0 < row["completion_len"] <= smoke.opsd.sampling.max_new_tokens
    assert row["lr"] == first_lr
    assert math.isfinite(row["grad_norm"]) and row["grad_norm"] > 0
    after = dict(model.named_parameters())
    trainable = {n for n, p in after.items() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for name, p in after.items():
        if name not in trainable:
            assert torch.equal(p, before[name]), f"frozen {name} changed"
    lora_b = {n for n in trainable if "lora_B" in n}
    assert lora_b and all(not torch.equal(after[n], before[n]) for n in lora_b)
    # B starts at zero, so A gets no gradient on the first step (and AdamW has no weight decay here)
    assert all(torch.equal(after[n], before[n]) for n in trainable - lora_b)

    model2, _ = load_policy(smoke)
    again = _trainer(smoke, model2, tok, tmp_path / "b").step(0)
    for key in ("loss", "kl", "completion_len", "ended_frac", "lr", "grad_norm"):
        assert again[key] == row[key], key
    for name, p in model2.named_parameters():
        assert torch.equal(p, after[name]), name


def test_a_saved_candidate_that_does_not_reproduce_the_model_is_refused(smoke: Params, tmp_path: Path) -> None:
    """The adapter is saved, the base is reloaded from disk: a base weight changed in memory (which the
    adapter file cannot carry) makes the reloaded model differ, and nothing is left behind."""
    model, tok = load_policy(smoke)
    base_path = resolve_base_dir(smoke.model, ROOT)
    good = tmp_path / "good"
    meta = save_candidate(smoke, good, model, tok, base_path, "d" * 16, torch.device("cpu"))
    assert meta["adapter"] is True and meta["data_hash"] == "d" * 16
    assert (good / "models/candidate/opsd_candidate.json").is_file()
    assert sorted(p.name for p in (good / "models").iterdir()) == ["candidate"]

    name, layer = next((n, m) for n, m in model.named_modules() if hasattr(m, "lora_A"))
    with torch.no_grad():
        layer.base_layer.weight.add_(1.0)
    bad = tmp_path / "bad"
    with pytest.raises(TrainingError, match=r"^saved candidate does not reproduce the trained model \(max \|Δlogit\| "):
        save_candidate(smoke, bad, model, tok, base_path, "d" * 16, torch.device("cpu"))
    assert not (bad / "models/candidate").exists()
    assert not (bad / "models").exists() or not list((bad / "models").iterdir())  # no temporary folder left


def test_lr_schedule_matches_the_formula_step_by_step() -> None:
    """lr at optimizer step s (0-based): warm-up lr·(s+1)/W for s < W, then lr·(m + (1-m)·d(p)) with
    p = (s-W)/(steps-W) capped at 1, d = 1-p (linear) or (1+cos πp)/2 (cosine); values worked out by hand
    for lr 0.1, W 2, steps 10, m 0.1."""
    expected = {
        # s:  0      1     2     4          6       8           10     12
        "cosine": [0.05, 0.1, 0.1, 0.0868198, 0.055, 0.0231802, 0.01, 0.01],
        "linear": [0.05, 0.1, 0.1, 0.0775, 0.055, 0.0325, 0.01, 0.01],
        "constant": [0.05, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1],
    }
    steps = [0, 1, 2, 4, 6, 8, 10, 12]
    for schedule, values in expected.items():
        cfg = TrainConfig(lr=0.1, steps=10, warmup_steps=2, min_lr_ratio=0.1, schedule=schedule)
        optimizer, scheduler = build_optimizer(torch.nn.Linear(2, 2), cfg)
        seen = []
        for s in range(max(steps) + 1):
            if s in steps:
                seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        assert seen == pytest.approx(values, abs=1e-7), schedule
    no_warmup = TrainConfig(lr=0.1, steps=10, warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
    optimizer, _ = build_optimizer(torch.nn.Linear(2, 2), no_warmup)
    assert optimizer.param_groups[0]["lr"] == 0.1  # step 0 is the full rate without warm-up
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer(frozen, cfg)
