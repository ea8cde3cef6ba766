"""Pipeline stages: read params, call components, write outputs and reports.

Each function is one ``opsd <stage>`` command and one DVC stage. Paths in params are relative to
``root`` (the project directory).
"""

from __future__ import annotations

import csv
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from opsd_core import distributed
from opsd_core.capabilities import probe
from opsd_core.config import Params
from opsd_core.environment import versions
from opsd_core.plan import ExecutionPlan, make_plan
from opsd_core.reports import file_hash, write_json
from opsd_core.trainer import CURVE_FIELDS, OPSDTrainer, TrainingError, load_problems, run_key


def configure_threads(threads: int | None) -> None:
    """Pin torch's intra-op threads; on small machines oversubscription costs far more than it gains."""
    if threads:
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- prepare -----------------------------------------------------------------------------------
def prepare(params: Params, root: Path) -> dict[str, Any]:
    from opsd_core.data import prepare_data
    from opsd_core.models import load_tokenizer

    tokenizer = load_tokenizer(params.model, root)

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    summary = prepare_data(params.data, root, count_tokens, root / params.train.reports_dir)
    return summary if isinstance(summary, dict) else vars(summary)


# -- train -------------------------------------------------------------------------------------
def execution_plan(params: Params) -> ExecutionPlan:
    """This machine's paths for ``params``; an impossible explicit setting fails here, before any work."""
    return make_plan(params, probe())


def _data_hash(params: Params, root: Path) -> str:
    report = root / params.train.reports_dir / "data.json"
    if report.is_file():
        value = json.loads(report.read_text()).get("data_hash")
        if value:
            return str(value)
    return file_hash(root / params.data.prepared_dir / "train.jsonl")


def build_policy(params: Params, root: Path, plan: ExecutionPlan) -> tuple[torch.nn.Module, Any, str]:
    """Base model (+ LoRA) ready to train; returns (model, tokenizer, resolved base path)."""
    from opsd_core.models import load_model_and_tokenizer, resolve_base_dir, wrap_lora

    base_path = resolve_base_dir(params.model, root)
    model, tokenizer = load_model_and_tokenizer(params.model, root, dtype=getattr(torch, plan.precision))
    torch.manual_seed(params.train.seed)  # LoRA A init
    if params.lora.enabled:
        model = wrap_lora(model, params.lora)
    else:
        model.requires_grad_(True)
    return model.to(plan.device), tokenizer, base_path


def _probe_logits(model: torch.nn.Module, tokenizer: Any, dev: torch.device) -> torch.Tensor:
    from opsd_core.prompts import student_prompt_ids

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
    from opsd_core.models import load_candidate, weights_hash

    out = root / params.train.output_dir
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    expected = _probe_logits(model, tokenizer, dev)
    reloaded, _ = load_candidate(base_path, tmp, dtype=next(model.parameters()).dtype)
    got = _probe_logits(reloaded.to(dev), tokenizer, dev)
    del reloaded
    if not torch.allclose(expected, got, atol=1e-4, rtol=1e-4):
        diff = (expected - got).abs().max().item()
        shutil.rmtree(tmp, ignore_errors=True)
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
    write_json(tmp / "opsd_candidate.json", meta)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return meta


def _write_curve(path: Path, rows: list[dict[str, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CURVE_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]) for k in CURVE_FIELDS})


def _device(plan: ExecutionPlan) -> torch.device:
    if plan.device == "cuda" and distributed.launched_size() > 1:  # one GPU per rank
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(plan.device)


def train(params: Params, root: Path) -> dict[str, Any] | None:
    """Train and write the candidate; under torchrun every rank trains its share and rank 0 writes
    (the other ranks return None)."""
    train_file = root / params.data.prepared_dir / "train.jsonl"
    if not train_file.is_file():  # before loading (or converting) any model
        raise TrainingError(f"{train_file} does not exist: run `opsd prepare` first")
    size = distributed.launched_size()
    # ranks share the machine's cores: train.threads is the whole budget
    configure_threads(max(1, params.train.threads // size) if params.train.threads else None)
    plan = execution_plan(params)
    dev = _device(plan)
    world = distributed.init(dev)
    for warning in [*plan.warnings, *params.opsd.advice()] if world.main else ():
        print(f"opsd train: warning: {warning}", file=sys.stderr)
    started = time.perf_counter()
    model, tokenizer, base_path = build_policy(params, root, plan)
    problems = load_problems(train_file, tokenizer,
                             thinking=params.model.thinking)
    data_hash = _data_hash(params, root)
    run_dir = root / params.train.checkpoint_dir / run_key(params, data_hash)
    trainer = OPSDTrainer(params, model, tokenizer, problems, dev, run_dir, plan=plan, world=world,
                          log=(lambda msg: print(msg, file=sys.stderr)) if world.main else (lambda _msg: None))
    try:
        state = trainer.run()
    finally:
        distributed.close(world)
    if not world.main:
        return None
    reports = root / params.train.reports_dir
    _write_curve(reports / "train_curve.csv", state.curve)
    meta = save_candidate(params, root, model, tokenizer, base_path, data_hash, dev)
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
        "steps": state.step,
        "problems": len(problems),
        "first_loss": curve[0]["loss"] if curve else None,
        "final_loss": curve[-1]["loss"] if curve else None,
        "final_kl": curve[-1]["kl"] if curve else None,
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
        "execution": trainer.execution(),
        "machine": probe().as_dict(),
        "versions": versions(),
    }
    if dev.type == "cuda":
        summary["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    write_json(reports / "train.json", summary)
    print(f"candidate written to {root / params.train.output_dir}", file=sys.stderr)
    return summary


# -- evaluate ----------------------------------------------------------------------------------
def evaluate(params: Params, root: Path, which: str = "candidate") -> dict[str, Any]:
    """``base``: evaluate the base model alone (its own cached DVC stage); ``candidate``: compare."""
    from opsd_core.evaluation.report import run_evaluate_base, run_evaluate_candidate

    configure_threads(params.train.threads)
    if which == "base":
        return run_evaluate_base(params, root)
    report = run_evaluate_candidate(params, root)
    _write_eval_plot(root / params.train.reports_dir / "eval_plot.csv", report)
    return report


def _write_eval_plot(path: Path, report: dict[str, Any]) -> None:
    """One row per task (base, candidate, interval of the difference): the DVC plot of evaluate."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["task", "base", "candidate", "diff_ci_low", "diff_ci_high"])
        for task, entry in sorted(report["tasks"].items()):
            diff = entry.get("diff") or {}
            writer.writerow([task, entry["base"]["score"], entry["candidate"]["score"],
                             diff.get("ci_low"), diff.get("ci_high")])
