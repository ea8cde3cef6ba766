"""Training-step cases driven by opsd: ``opsd`` (OPSDTrainer) and ``naive`` (the obvious full-logits step).

``opsd_bf16s`` is ``opsd`` with ``opsd.sampling.dtype=bfloat16`` (opsd's rollouts from a bf16 copy of
the policy, its LoRA delta unmerged) and ``opsd_fast`` adds ``train.frozen_dtype=bfloat16`` (the products with the frozen
base weights, student and fixed teacher, in bf16 as autocast would run them; LoRA, residual stream, loss
and optimizer in fp32); both are reported separately because their precision differs from TRL's fp32
run (``trl_bf16``, TRL at its default bf16 autocast, is the closer partner of ``opsd_fast``).

All build the policy exactly as ``opsd train`` does (``stages.build_policy``: load, seeded LoRA wrap):

* ``opsd``: ``OPSDTrainer.rollout`` (opsd's decoder engine on a merged copy in the training dtype) →
  ``accumulate`` (teacher scored by the engine over the base weights without padding; student decoder-only
  pass, completion hidden states, chunked fp32 divergence) → ``optimizer_step``;
* ``naive``: transformers ``generate`` on the LoRA model, then full ``model(...).logits`` [B, T, V] for the
  teacher (adapter disabled) and the student, completion positions sliced out, fp32 log-softmax, forward
  KL over the whole vocabulary, masked mean over the step's tokens, backward; then the same clip + AdamW.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import MODEL_CACHE, REPO, model_source, trace_problems
from benchmarks.recorder import StepRecorder

LORA_TARGETS = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"


def opsd_params(spec: dict[str, Any]) -> Any:
    """Params for a case: the repo's params.yaml, with every compared setting pinned by the spec."""
    from opsd_core.config import load_params

    overrides = [f"model.base={model_source(spec['model'])}", f"model.cache_dir={MODEL_CACHE}",
                 f"train.threads={spec['threads']}", f"train.device={spec['device'].split(':')[0]}"]
    if spec.get("profile") != "default":
        precision = spec["precision"]
        # opsd_bf16s: opsd's own fast path (rollouts from a bf16 copy, LoRA delta unmerged); not identical precision.
        # opsd_fast: also the frozen base's products (student and fixed teacher) in bf16.
        sampling = "bfloat16" if spec["impl"] in ("opsd_bf16s", "opsd_fast") else precision
        overrides += [
            f"lora.r={spec['lora_r']}", f"lora.alpha={spec['lora_alpha']}", "lora.dropout=0.0",
            f"lora.target_modules={LORA_TARGETS}",
            "opsd.divergence=forward_kl", "opsd.support=full", "opsd.clip=none", "opsd.teacher=fixed",
            "opsd.temperature=null",
            f"opsd.sampling.max_new_tokens={spec['new_tokens']}", "opsd.sampling.temperature=1.1",
            "opsd.sampling.top_p=0.95", "opsd.sampling.top_k=20", f"opsd.sampling.dtype={sampling}",
            f"train.rollouts_per_step={spec['rollouts']}", f"train.micro_batch_size={spec['micro_batch']}",
            "train.lr=1.0e-4", "train.grad_clip=1.0", "train.weight_decay=0.0", "train.warmup_steps=1",
            "train.schedule=cosine", f"train.steps={spec['warmup'] + spec['steps']}",
            f"train.precision={precision}", "train.seed=0", "train.progress=false",
        ]
        if spec.get("fixed_length", True):
            overrides.append(f"opsd.sampling.min_new_tokens={spec['new_tokens']}")
        if spec["impl"] == "opsd_fast":
            overrides.append("train.frozen_dtype=bfloat16")
        if spec.get("sampler"):  # the rehearsal on a CPU samples as CUDA does (static); else the device's default
            overrides.append(f"opsd.sampling.backend={spec['sampler']}")
    return load_params(REPO / "params.yaml", overrides=overrides)


def _setup(spec: dict[str, Any]) -> tuple[Any, Any, Any, list[Any], Any]:
    import torch

    from opsd_core.algorithm.prompts import student_prompt_ids, teacher_prompt_ids
    from opsd_core.algorithm.trainer import Problem
    from opsd_core.models.lora import unwrap
    from opsd_core.stages.train import build_policy, execution_plan

    params = opsd_params(spec)
    dev = torch.device(spec["device"])
    model, tokenizer, _ = build_policy(params, REPO, execution_plan(params))
    if spec.get("fixed_length", True) and spec.get("profile") != "default":
        # same token count on every side: no end-of-sequence before the budget (TRL gets the same setting)
        unwrap(model).generation_config.min_new_tokens = params.opsd.sampling.max_new_tokens
    n = params.train.rollouts_per_step * (spec["warmup"] + spec["steps"])
    problems = [
        Problem(t.id, student_prompt_ids(tokenizer, t.problem), teacher_prompt_ids(tokenizer, t.problem, t.solution))
        for t in trace_problems(n)
    ]
    return params, model, tokenizer, problems, dev


def _batch(problems: list[Any], step: int, per_step: int) -> list[Any]:
    # the k-th block of problems, in order: every implementation sees the same prompts at the same step
    return problems[step * per_step:(step + 1) * per_step]


@dataclass
class StepBatches:
    """Step 0 of a case taken apart: its problems, rollouts, and the micro-batches both roles score."""

    batch: list[Any]
    rollouts: Any
    parts: list[tuple[list[Any], Any, Any]]  # (problems, completion ids, completion mask) per micro-batch
    student: list[Any]  # ScoringBatch per micro-batch
    teacher: list[Any]


def step_batches(trainer: Any, problems: list[Any], per_step: int, micro_batch: int) -> StepBatches:
    """Sample step 0 with ``trainer`` and lay its rollouts out as the scoring micro-batches (tools timing pieces)."""
    from opsd_core.algorithm.scoring import build_scoring_batch

    batch = _batch(problems, 0, per_step)
    rollouts = trainer.rollout(batch, 0)
    parts = [(batch[i:i + micro_batch], rollouts.completion_ids[i:i + micro_batch],
              rollouts.completion_mask[i:i + micro_batch]) for i in range(0, len(batch), micro_batch)]
    pad = trainer.pad_id
    return StepBatches(batch, rollouts, parts,
                       [build_scoring_batch([p.student_ids for p in b], i, m, pad) for b, i, m in parts],
                       [build_scoring_batch([p.teacher_ids for p in b], i, m, pad) for b, i, m in parts])


def run_opsd(spec: dict[str, Any], rec: StepRecorder, tmp: Path) -> dict[str, Any]:
    from opsd_core.stages.train import build_trainer

    params, model, tokenizer, problems, dev = _setup(spec)
    trainer = build_trainer(params, model, tokenizer, problems, dev, tmp / "run", log=lambda _msg: None)
    default = spec.get("profile") == "default"
    per_step = params.train.rollouts_per_step
    for k in range(spec["warmup"] + spec["steps"]):
        rec.step_begin()
        batch = trainer.batch_for(k) if default else _batch(problems, k, per_step)
        rec.sample_begin()
        rollouts = trainer.rollout(batch, k)
        rec.sample_end(rollouts.num_tokens)
        trainer.accumulate(batch, rollouts)
        rec.opt_begin()
        trainer.optimizer_step()
        lengths = rollouts.completion_mask.sum(dim=1).tolist()
        rec.note(sequences=[(len(p.student_ids), len(p.teacher_ids), int(n)) for p, n in zip(batch, lengths, strict=True)])
        rec.step_end()
    return {"model": model, "params": params}


def naive_token_kl(student_logits: Any, teacher_logits: Any, temperature: float) -> Any:
    """[B, L, V] logits → [B, L] forward KL(p_T || p_S) over the whole vocabulary, in fp32."""
    import torch

    ls = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    lt = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (lt.exp() * (lt - ls)).sum(-1)


def _full_logits(model: Any, prompts: list[list[int]], completion: Any, mask: Any, pad_id: int) -> Any:
    """Full-sequence logits of prompt ⊕ completion, then the rows that predict the completion."""
    import torch

    from opsd_core.algorithm.rollout import left_pad

    ids, attn = left_pad(prompts, pad_id)
    width = ids.shape[1]
    ids = torch.cat([ids, completion], dim=1)
    attn = torch.cat([attn, mask.long()], dim=1)
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    dev = next(model.parameters()).device
    logits = model(input_ids=ids.to(dev), attention_mask=attn.to(dev), position_ids=pos.to(dev)).logits
    return logits[:, width - 1:width - 1 + completion.shape[1]]


def run_naive(spec: dict[str, Any], rec: StepRecorder, tmp: Path) -> dict[str, Any]:
    import torch

    from opsd_core.algorithm.rollout import eos_token_ids, sample

    params, model, tokenizer, problems, dev = _setup(spec)
    cfg = params.train
    pad_id = tokenizer.pad_token_id
    eos = eos_token_ids(model, tokenizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    temperature = params.opsd.sampling.temperature
    for k in range(spec["warmup"] + spec["steps"]):
        rec.step_begin()
        batch = _batch(problems, k, cfg.rollouts_per_step)
        rec.sample_begin()
        rollouts = sample(model, [p.student_ids for p in batch], params.opsd.sampling, pad_id, eos, k, dev)
        rec.sample_end(rollouts.num_tokens)
        model.train()
        total = rollouts.num_tokens
        for lo in range(0, len(batch), cfg.micro_batch_size):
            part = batch[lo:lo + cfg.micro_batch_size]
            ids = rollouts.completion_ids[lo:lo + cfg.micro_batch_size]
            mask = rollouts.completion_mask[lo:lo + cfg.micro_batch_size]
            with torch.no_grad(), model.disable_adapter():
                t_logits = _full_logits(model, [p.teacher_ids for p in part], ids, mask, pad_id)
            s_logits = _full_logits(model, [p.student_ids for p in part], ids, mask, pad_id)
            kl = naive_token_kl(s_logits, t_logits, temperature)
            loss = (kl * mask.to(kl.device, kl.dtype)).sum() / total
            loss.backward()
        rec.opt_begin()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lengths = rollouts.completion_mask.sum(dim=1).tolist()
        rec.note(sequences=[(len(p.student_ids), len(p.teacher_ids), int(n)) for p, n in zip(batch, lengths, strict=True)])
        rec.step_end()
    return {"model": model, "params": params}
