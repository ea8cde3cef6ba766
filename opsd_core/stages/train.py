"""``opsd train``: build the policy and the trainer's parts, train, write and verify the candidate.

Under torchrun every rank trains its share of each step and rank 0 writes. Paths in params are
relative to ``root`` (the project directory).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from opsd_core import checkpoint as ckpt
from opsd_core.algorithm.diagnose import record_gap
from opsd_core.algorithm.losses import DivergenceSpec
from opsd_core.algorithm.optim import build_optimizer
from opsd_core.algorithm.prompts import student_prompt_ids
from opsd_core.algorithm.teacher import make_teacher
from opsd_core.algorithm.trainer import (
    CURVE_FIELDS,
    OPSDTrainer,
    Problem,
    TrainerParts,
    TrainingError,
    load_problems,
    run_key,
)
from opsd_core.backends import distributed, fsdp
from opsd_core.backends.base import Backend
from opsd_core.backends.capabilities import probe
from opsd_core.backends.cpu import CpuBackend
from opsd_core.backends.environment import versions
from opsd_core.backends.packs import for_plan
from opsd_core.backends.plan import ExecutionPlan, make_plan
from opsd_core.backends.runtime import configure_threads, peak_rss_mb, tune_allocator
from opsd_core.config import Params
from opsd_core.io import atomic_dir, atomic_write, file_hash, write_json, write_metrics
from opsd_core.layout import CANDIDATE_META, DIAGNOSIS_REPORT, Env, Layout
from opsd_core.models.lora import wrap_lora
from opsd_core.models.sources import load_candidate, load_model_and_tokenizer, resolve_base_dir, weights_hash
from opsd_core.registry import card
from opsd_core.registry.live import LiveMetrics


def execution_plan(params: Params, world_size: int | None = None) -> ExecutionPlan:
    """This machine's paths for ``params``; an impossible explicit setting fails here, before any work.
    ``world_size``: the processes training (default: torchrun's when launched by it, else ``train.nproc``)."""
    launched = distributed.launched_size()
    return make_plan(params, probe(), world_size=world_size or (launched if launched > 1 else params.train.nproc))


def _data_hash(params: Params, root: Path) -> str:
    layout = Layout.of(params, root)
    report = layout.data_report
    if report.is_file():
        value = json.loads(report.read_text()).get("data_hash")
        if value:
            return str(value)
    return file_hash(layout.train_split)


def build_policy(params: Params, root: Path, plan: ExecutionPlan) -> tuple[torch.nn.Module, Any, str]:
    """Base model (+ LoRA) ready to train; returns (model, tokenizer, resolved base path)."""
    base_path = resolve_base_dir(params.model, root)
    model, tokenizer = load_model_and_tokenizer(params.model, root, dtype=getattr(torch, plan.precision))
    torch.manual_seed(params.train.seed)  # LoRA A init
    if params.lora.enabled:
        model = wrap_lora(model, params.lora)
    else:
        model.requires_grad_(True)
    return model.to(plan.device), tokenizer, base_path


def training_problems(params: Params, train_file: Path, tokenizer: Any) -> list[Problem]:
    """The prepared training rows tokenized as ``params`` asks: both contexts, the solution, and the wrong
    solution's context where ``opsd.contrast`` needs it."""
    return load_problems(train_file, tokenizer, thinking=params.model.thinking, context=params.opsd.teacher_context,
                         seed=params.train.seed, instruction=params.opsd.teacher_instruction,
                         contrast=params.opsd.contrast != "none")


def build_backend(params: Params, model: torch.nn.Module, plan: ExecutionPlan, device: torch.device,
                  log: Callable[[str], None]) -> Backend:
    """The back-end the plan chose for this device."""
    sampling_dtype = getattr(torch, plan.sampling_dtype)
    full_copy = plan.data_parallel == "fsdp2"  # a sharded policy cannot decode rank by rank: see PolicySampler
    if device.type == "cpu":
        return CpuBackend(model, sampling_dtype, plan.sampler, log, packs=for_plan(plan),
                          sampler_packs=for_plan(plan, frozen_dtype=False), full_copy=full_copy)
    return Backend(model, sampling_dtype, plan.sampler, log, full_copy=full_copy)


def build_parts(params: Params, model: torch.nn.Module, plan: ExecutionPlan, device: torch.device,
                log: Callable[[str], None] = lambda _msg: None) -> TrainerParts:
    """The trainer's parts for ``params``: back-end, teacher, loss spec, optimizer and schedule.

    With the plan's ``fsdp2`` the model is sharded here (under torchrun), after the parts that copy its
    whole weights and before the optimizer, which must hold the shards.
    """
    backend = build_backend(params, model, plan, device, log)
    teacher_dtype = getattr(torch, plan.teacher_dtype) if plan.teacher_dtype else None
    # full fine-tuning's fixed teacher is a frozen whole copy made now, from the unsharded weights: one more
    # copy of the weights on every rank (3.4 GB for 1.7B in bf16), well below what sharding saves there
    # (the replicated gradients and two AdamW moments: three times the weights' bytes, or more)
    teacher = make_teacher(params.opsd.teacher, model, params.opsd.ema_decay, teacher_dtype, backend)
    if plan.data_parallel == "fsdp2":
        fsdp.shard(model)
    spec = DivergenceSpec.from_config(params.opsd, params.opsd.sampling.temperature)
    optimizer, scheduler = build_optimizer(model, params.train)
    return TrainerParts(teacher=teacher, backend=backend, spec=spec, optimizer=optimizer, scheduler=scheduler)


def build_trainer(params: Params, model: torch.nn.Module, tokenizer: Any, problems: list[Problem],
                  device: torch.device, run_dir: Path, plan: ExecutionPlan | None = None,
                  world: distributed.World | None = None,
                  log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)) -> OPSDTrainer:
    """An :class:`OPSDTrainer` over freshly built parts (``plan``: default, made for this machine)."""
    plan = plan or execution_plan(params)
    parts = build_parts(params, model, plan, device, log)
    return OPSDTrainer(params, model, tokenizer, problems, parts, device, run_dir, world=world, log=log)


def execution_record(plan: ExecutionPlan, trainer: OPSDTrainer) -> dict[str, Any]:
    """The plan plus what was built from it (the sampler's and the teacher's passes)."""
    record = plan.as_dict()
    record["sampler"] = trainer.backend.describe_sampler()
    record["teacher_pass"] = f"{trainer.params.opsd.teacher}: {trainer.teacher.describe()}"
    return record


def params_per_rank(model: torch.nn.Module, world: distributed.World, device: torch.device) -> list[int]:
    """Trained parameter elements each rank stores (collective): the whole model on each, except under FSDP2."""
    mine = fsdp.local_numel(p for p in model.parameters() if p.requires_grad)
    return [int(n) for n in distributed.all_sum([float(mine) if r == world.rank else 0.0 for r in range(world.size)],
                                                world, device)]


def whole_policy(params: Params, root: Path, plan: ExecutionPlan, weights: dict[str, torch.Tensor]
                 ) -> torch.nn.Module:
    """A plain (unsharded) policy holding ``weights`` (trained parameters by name): what rank 0 saves after
    an FSDP2 run, so the candidate is written exactly as one process writes it."""
    model, _, _ = build_policy(params, root, plan)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights[name])
    return model


def _probe_logits(model: torch.nn.Module, tokenizer: Any, dev: torch.device) -> torch.Tensor:
    # the probe only compares the in-memory and the reloaded model: any fixed prompt does
    ids = torch.tensor([student_prompt_ids(tokenizer, "What is 12 + 30?")], device=dev)
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float().cpu()


def save_candidate(
    params: Params, root: Path, model: torch.nn.Module, tokenizer: Any, base_path: str,
    data_hash: str, dev: torch.device,
) -> dict[str, Any]:
    """Write the candidate atomically, reload it and compare logits with the in-memory model."""
    out = Layout.of(params, root).candidate
    # any failure below (a full disk, a candidate that does not reload) leaves the previous candidate in place
    with atomic_dir(out) as tmp:
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        except OSError as err:  # a full disk: the checkpoints hold the run
            raise TrainingError(f"cannot write the candidate to {out}: {err.strerror or err}; free space and rerun "
                                "`opsd train`: it resumes from its last checkpoint and writes the candidate") from err
        expected = _probe_logits(model, tokenizer, dev)
        reloaded, _ = load_candidate(base_path, tmp, dtype=next(model.parameters()).dtype)
        got = _probe_logits(reloaded.to(dev), tokenizer, dev)
        del reloaded
        if not torch.allclose(expected, got, atol=1e-4, rtol=1e-4):
            diff = (expected - got).abs().max().item()
            raise TrainingError(f"saved candidate does not reproduce the trained model (max |Δlogit| {diff:.3g})")
        meta = {
            "base_model": params.model.base,
            "base_path": base_path,
            "adapter": params.lora.enabled,
            "params_hash": params.hash(),
            "data_hash": data_hash,
            "content_hash": weights_hash(tmp),
            "steps": params.train.steps,
            "profile": params.profile,
        }
        write_json(tmp / CANDIDATE_META, meta)
    return meta


def _write_curve(path: Path, rows: list[dict[str, float]]) -> None:
    buffer = io.StringIO(newline="")
    # the columns the objective produced (SFT samples nothing; only SFT and mix have an sft_loss)
    fields = [k for k in CURVE_FIELDS if any(k in row for row in rows)]
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]) for k in fields if k in row})
    atomic_write(path, buffer.getvalue())


def _device(plan: ExecutionPlan) -> torch.device:
    if plan.device == "cuda" and distributed.launched_size() > 1:  # one GPU per rank
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(plan.device)


def train(params: Params, root: Path) -> dict[str, Any] | None:
    """Train and write the candidate; under torchrun every rank trains its share and rank 0 writes
    (the other ranks return None)."""
    layout = Layout.of(params, root)
    train_file = layout.train_split
    if not train_file.is_file():  # before loading (or converting) any model
        raise TrainingError(f"{train_file} does not exist: run `opsd prepare` first")
    size = distributed.launched_size()
    # ranks share the machine's cores: train.threads is the whole budget
    configure_threads(max(1, params.train.threads // size) if params.train.threads else None)
    plan = execution_plan(params, world_size=size)  # the processes running now (one outside torchrun)
    dev = _device(plan)
    world = distributed.init(dev)
    for warning in [*plan.warnings, *params.opsd.advice()] if world.main else ():
        print(f"opsd train: warning: {warning}", file=sys.stderr)
    started, started_at = time.perf_counter(), time.time()
    model, tokenizer, base_path = build_policy(params, root, plan)
    problems = training_problems(params, train_file, tokenizer)
    data_hash = _data_hash(params, root)
    run_dir = root / params.train.checkpoint_dir / run_key(params, data_hash)
    log = (lambda msg: print(msg, file=sys.stderr)) if world.main else (lambda _msg: None)
    if plan.allocator == "tuned" and not tune_allocator():
        log("train.cpu_allocator: glibc's mallopt refused the settings; malloc left as it is")
    trainer = build_trainer(params, model, tokenizer, problems, dev, run_dir, plan=plan, world=world, log=log)
    if world.main and os.environ.get(Env.PIPELINE_RUN):  # under the flow: the curve into MLflow as it grows
        trainer.on_step = LiveMetrics(params, root, os.environ[Env.PIPELINE_RUN], log)
    try:
        per_rank = params_per_rank(model, world, dev)
        # the starting model's gap, before any step (rank 0 alone: a sharded model's passes are collectives)
        diagnosis = record_gap(trainer, run_dir / DIAGNOSIS_REPORT, log) \
            if world.main and not fsdp.is_sharded(model) else None
        state = trainer.run()
        # gathered by every rank (a collective), kept by rank 0 only, which writes the candidate from them
        final = fsdp.gather_to_host(dict(model.named_parameters()), keep=world.main) \
            if fsdp.is_sharded(model) else None
    finally:
        distributed.close(world)
    if not world.main:
        return None
    execution = {**execution_record(plan, trainer), "params_per_rank": per_rank}
    if final is not None:
        del trainer, model
        model = whole_policy(params, root, plan, final)
    _write_curve(layout.train_curve, state.curve)
    card.plot_training_curve(state.curve, layout.training_plot)  # the DVC plot
    meta = save_candidate(params, root, model, tokenizer, base_path, data_hash, dev)
    for old in ckpt.prune_other_runs(run_dir, started_at):  # retention across trainings, not only within one
        log(f"removed the checkpoints of an earlier training: {old.name}")
    curve = state.curve
    sample_s = sum(r.get("sample_s", 0.0) for r in curve)
    train_s = sum(r.get("train_s", 0.0) for r in curve)
    tokens = sum(r["completion_len"] * params.train.rollouts_per_step for r in curve)
    summary = {
        "base_model": params.model.base,
        "profile": params.profile,
        "params_hash": meta["params_hash"],
        "data_hash": data_hash,
        "content_hash": meta["content_hash"],
        "objective": params.train.objective,
        "steps": state.step,
        "problems": len(problems),
        "first_loss": curve[0]["loss"] if curve else None,
        "final_loss": curve[-1]["loss"] if curve else None,
        "final_kl": curve[-1].get("kl") if curve else None,
        "first_sft_loss": curve[0].get("sft_loss") if curve else None,
        "final_sft_loss": curve[-1].get("sft_loss") if curve else None,
        "completion_tokens": tokens,
        "sampling_tokens_per_s": tokens / sample_s if sample_s else None,
        "training_tokens_per_s": tokens / train_s if train_s else None,
        "wall_s": time.perf_counter() - started,
        "peak_rss_mb": peak_rss_mb(),
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "world_size": world.size,
        "rollouts_per_rank": [len(distributed.World(r, world.size).rows(params.train.rollouts_per_step))
                              for r in range(world.size)],
        "diagnosis": diagnosis,
        "execution": execution,
        "machine": probe().as_dict(),
        "versions": versions(),
    }
    if dev.type == "cuda":
        summary["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    write_json(layout.train_report, summary)
    # the few numbers worth a column in `dvc metrics show`; speed, memory and the diagnosis are in train.json
    write_metrics(layout.reports, "train",
                  {k: summary.get(k) for k in ("steps", "first_loss", "final_loss", "wall_s")}
                  | {"teacher_gap": (diagnosis or {}).get("accuracy_gap")})
    print(f"candidate written to {layout.candidate}", file=sys.stderr)
    return summary
