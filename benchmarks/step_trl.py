"""Training-step cases ``trl`` / ``trl_bf16``: TRL's real ``SDFTTrainer`` (trl.experimental.sdft) at opsd's settings.

The same base model and tokenizer (loaded by opsd's loader), the same LoRA layers (peft), prompts,
rollouts per step, micro-batch, completion length (``min_new_tokens = max_new_tokens`` on both
sides), sampling parameters, AdamW + clip + cosine schedule, fp32 (or the spec's precision on both
sides). TRL's defaults that would make the comparison unequal are switched off and listed here:
``gradient_checkpointing`` (TRL default on; opsd does not recompute), ``bf16`` autocast (TRL default
on; the weights are already in the spec's dtype; ``trl_bf16`` keeps it on, the partner of
``opsd_fast``), importance-sampling clip (opsd has none), dataset
shuffling (both sides take the problems in the same order), ``num_generations=1`` (one rollout per
problem, as opsd). Loss: ``full_logits`` with ``distillation_alpha=0`` = forward KL(p_T || p_S) over
the whole vocabulary, logits divided by the sampling temperature, as opsd. The teacher is ``base``
(the same module with the adapter disabled), opsd's ``fixed`` teacher.

Timing comes from trainer callbacks and two wrapped bound methods (``_generate_transformers`` for the
sampling clock, ``training_step`` to find where the optimizer phase starts); nothing is replaced.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, trace_problems
from benchmarks.recorder import StepRecorder
from benchmarks.step_opsd import opsd_params


def _dataset_rows(n: int) -> list[dict[str, Any]]:
    from opsd_core.algorithm.prompts import student_messages

    return [{"prompt": student_messages(t.problem), "privileged_context": t.solution.strip()}
            for t in trace_problems(n)]


def _teacher_template() -> str:
    # the teacher content of opsd's prompts (problem, delimited solution, instruction), as a TRL template;
    # TRL appends after the student text, so the pieces are the same and only their order differs
    from opsd_core.algorithm.prompts import SOLUTION_BEGIN, SOLUTION_END, TEACHER_INSTRUCTION

    return "{prompt}\n\n" + SOLUTION_BEGIN + "\n{privileged_context}\n" + SOLUTION_END + "\n\n" + TEACHER_INSTRUCTION


def run_trl(spec: dict[str, Any], rec: StepRecorder, tmp: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType
    from transformers import TrainerCallback
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from opsd_core.models.sources import load_model_and_tokenizer
    from opsd_core.stages.train import execution_plan

    params = opsd_params(spec)
    dev = torch.device(spec["device"])
    dtype = getattr(torch, execution_plan(params).precision if dev.type == "cuda" else spec["precision"])
    model, tokenizer = load_model_and_tokenizer(params.model, REPO, dtype=dtype)
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = [t for t in params.lora.target_modules if t in linear]
    lora = PeftLoraConfig(task_type=TaskType.CAUSAL_LM, r=params.lora.r, lora_alpha=params.lora.alpha,
                          lora_dropout=params.lora.dropout, target_modules=targets)
    per_step, mb = params.train.rollouts_per_step, params.train.micro_batch_size
    total_steps = spec["warmup"] + spec["steps"]
    length = params.opsd.sampling.max_new_tokens
    args = SDFTConfig(
        output_dir=str(tmp / "trl"),
        per_device_train_batch_size=mb,
        gradient_accumulation_steps=per_step // mb,
        num_generations=1,
        max_steps=total_steps,
        max_prompt_length=None,
        max_completion_length=length,
        temperature=params.opsd.sampling.temperature,
        top_p=params.opsd.sampling.top_p,
        top_k=params.opsd.sampling.top_k,
        generation_kwargs={"min_new_tokens": length} if spec.get("fixed_length", True) else None,
        distillation_mode="full_logits",
        distillation_alpha=0.0,
        distillation_is_clip=None,
        teacher_model_kind="base",
        teacher_prompt_template=_teacher_template(),
        use_vllm=False,
        shuffle_dataset=False,
        gradient_checkpointing=False,
        bf16=spec["impl"] == "trl_bf16",  # TRL's default: autocast to bf16 over the spec-dtype weights
        fp16=False,
        use_cpu=dev.type == "cpu",
        learning_rate=params.train.lr,
        weight_decay=params.train.weight_decay,
        adam_beta1=params.train.betas[0],
        adam_beta2=params.train.betas[1],
        max_grad_norm=params.train.grad_clip or 0.0,
        lr_scheduler_type="cosine",
        warmup_steps=params.train.warmup_steps,
        optim="adamw_torch",
        seed=params.train.seed,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
    )
    prompt_lens: list[list[int]] = []
    calls = {"training_step": 0}

    class Timer(TrainerCallback):
        def on_step_begin(self, *_a: Any, **_k: Any) -> None:
            prompt_lens.clear()
            rec.step_begin()

        def on_step_end(self, *_a: Any, **_k: Any) -> None:
            student, teacher = (prompt_lens + [[], []])[:2]
            rec.note(sequences=[(s, t, length_by_row[i]) for i, (s, t) in enumerate(zip(student, teacher, strict=True))])
            rec.step_end()

    trainer = SDFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(_dataset_rows(per_step * total_steps)),
                          processing_class=tokenizer, peft_config=lora, callbacks=[Timer()])
    length_by_row: list[int] = []
    generate, tokenize, training_step = (trainer._generate_transformers, trainer._tokenize_prompts,
                                         trainer.training_step)

    def timed_generate(prompt_ids: list[list[int]]) -> Any:
        rec.sample_begin()
        phase[0] = "sampling"
        out = generate(prompt_ids)
        phase[0] = "scoring"
        length_by_row[:] = [len(c) for c in out[1]]
        rec.sample_end(sum(length_by_row))
        return out

    def recorded_tokenize(prompts: list[Any]) -> list[list[int]]:
        ids = tokenize(prompts)
        prompt_lens.append([len(x) for x in ids])
        return ids

    def marked_training_step(*a: Any, **k: Any) -> Any:
        out = training_step(*a, **k)
        calls["training_step"] += 1
        if calls["training_step"] % args.gradient_accumulation_steps == 0:
            rec.opt_begin()  # the trainer clips, steps the optimizer and scheduler, zeroes grads next
        return out

    # which precision the layers really ran in: autocast states seen by the first decoder layer, by phase
    autocast_seen: set[str] = set()
    phase = ["scoring"]
    first_layer = next(m for n, m in trainer.model.named_modules() if n.endswith("layers.0"))
    first_layer.register_forward_pre_hook(
        lambda *_a: autocast_seen.add(f"{phase[0]}:{'bf16' if torch.is_autocast_enabled(dev.type) else 'off'}"))
    trainer._generate_transformers = timed_generate
    trainer._tokenize_prompts = recorded_tokenize
    trainer.training_step = marked_training_step
    start = time.perf_counter()
    trainer.train()
    return {"model": trainer.model, "params": params, "train_wall_s": time.perf_counter() - start,
            "autocast": sorted(autocast_seen)}
