"""``opsd evaluate``: base (cached) and candidate on identical settings, combined into ``eval.json``.

The base evaluation depends only on the base model, the eval data, the eval settings and the
prompt, all folded into ``settings_hash``; ``reports/eval_base.json`` is reused by the candidate run
only when its hash matches, otherwise the base is re-evaluated in the same run.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from opsd_core.algorithm.prompts import ANSWER_INSTRUCTION, student_messages
from opsd_core.backends.capabilities import CapabilityError
from opsd_core.backends.runtime import configure_threads
from opsd_core.config import Params
from opsd_core.evaluation.bootstrap import compare_samples
from opsd_core.evaluation.errors import EvalError
from opsd_core.evaluation.harness import ModelEval, TaskEval, evaluate_model, task_groups
from opsd_core.evaluation.progress import EvalProgress
from opsd_core.evaluation.summary import task_summary
from opsd_core.evaluation.tasks import GSM8K_TASK, VAL_TASK, data_files, with_flexible, write_task_yamls
from opsd_core.io import file_hash, json_hash, write_json, write_metrics
from opsd_core.layout import Layout
from opsd_core.models.sources import resolve_base_dir
from opsd_core.registry import card
from opsd_core.stages.train import build_backend, execution_plan

if TYPE_CHECKING:
    from opsd_core.evaluation.opsd_lm import Sampler, SamplerFactory


def eval_device(params: Params) -> str:
    """The evaluation's device, decided by the execution plan as training's is (so ``OPSD_HIDE`` and the
    capability probe apply): ``eval.device`` when it is set, else ``train.device``'s choice."""
    setting = params.eval.device if params.eval.device != "auto" else params.train.device
    train = params.train.model_copy(update={"device": setting, "nproc": 1})
    try:
        return execution_plan(params.model_copy(update={"train": train}), world_size=1).device
    except CapabilityError as err:
        raise CapabilityError(f"evaluation on {setting}: {err}") from None


def _rel(path: str | Path, root: Path) -> str:
    """A path relative to the repo root when inside it, so reports do not depend on the checkout."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path(root).resolve()))
    except ValueError:
        return str(p)


def data_paths(params: Params, root: Path) -> dict[str, Path]:
    layout = Layout.of(params, root)
    return data_files(layout.val_split, layout.gsm8k_eval)


# raised whenever opsd's own scoring of a task changes (task configs, grouping, metrics), so a base evaluation
# cached by an older opsd is re-run instead of compared with a candidate scored differently (2: the answer
# lines in their own lm-eval pass, the flexible match). The lm-eval model (eval.backend) is in the eval
# settings themselves: a base cached with the other backend is re-run too.
SCORING_VERSION = 2


def settings(params: Params, root: Path, device: str) -> dict[str, Any]:
    """Everything that determines a model's scores apart from its weights."""
    paths = data_paths(params, root)
    eval_cfg = params.eval.model_dump(mode="json")
    eval_cfg.pop("bootstrap_samples")  # only affects the comparison, not either model's scores
    return {
        "eval": eval_cfg,
        "base_model": params.model.model_dump(mode="json"),
        "data": {name: file_hash(paths[name]) if paths[name].is_file() else None
                 for name in params.eval.tasks if name in paths},
        # the student prompt as a whole, so a prompt change invalidates the cached base
        "prompt": student_messages("{problem}"),
        "answer_instruction": ANSWER_INSTRUCTION,
        "device": device,
        "lm_eval": version("lm_eval"),
        "scoring": SCORING_VERSION,
    }


def settings_hash(values: dict[str, Any]) -> str:
    return json_hash(values)


def _prepare(params: Params, root: Path) -> tuple[dict[str, Any], str, Path, list[str], str]:
    device = eval_device(params)
    values = settings(params, root, device)
    digest = settings_hash(values)
    tasks_dir = Layout.of(params, root).state / "eval_tasks" / digest
    paths = data_paths(params, root)
    write_task_yamls(tasks_dir, paths[VAL_TASK], paths[GSM8K_TASK], params.eval)
    tasks = list(dict.fromkeys([*params.eval.tasks, *params.eval.extra_tasks]))
    base_dir = resolve_base_dir(params.model, root)
    return values, digest, tasks_dir, tasks, str(base_dir)


def _settings_block(values: dict[str, Any], digest: str) -> dict[str, Any]:
    return {"settings_hash": digest, **values}


def _progress(stage: str, models: list[str], tasks: list[str], backend: str,
              prior: dict[str, float] | None = None) -> EvalProgress:
    """The stage's groups of tasks, model by model, with a progress line printed before (when it can be
    estimated already) and after each group."""
    steps = [(model, kind) for model in models for kind, _ in task_groups(tasks, backend)]
    progress = EvalProgress(stage, steps, dict(prior or {}))
    if (line := progress.opening()) is not None:
        print(line, file=sys.stderr, flush=True)
    return progress


def _on_group(progress: EvalProgress, model: str) -> Callable[[str, float], None]:
    return lambda kind, seconds: print(progress.record(model, kind, seconds), file=sys.stderr, flush=True)


def sampler_factory(params: Params, device: str) -> SamplerFactory:
    """What ``eval.backend: opsd`` decodes with: the trainer's back-end over the evaluated model (on a CPU the
    decoder engine on a merged copy, with oneDNN packs where the plan has them), in the model's own dtype."""

    def build(model: torch.nn.Module) -> Sampler:
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        if dtype not in ("float32", "bfloat16"):
            raise EvalError(f"eval.backend opsd decodes in float32 or bfloat16, not {dtype} (eval.dtype "
                            f"{params.eval.dtype}): set eval.dtype, or eval.backend: hf")
        # the plan for one process on the evaluation's device; training-only choices (frozen_dtype) left out
        train = params.train.model_copy(update={"device": device, "precision": dtype, "nproc": 1,
                                                "frozen_dtype": None})
        sampling = params.opsd.sampling.model_copy(update={"dtype": dtype})
        evaluated = params.model_copy(update={"train": train,
                                              "opsd": params.opsd.model_copy(update={"sampling": sampling})})
        plan = execution_plan(evaluated, world_size=1)
        backend = build_backend(evaluated, model, plan, torch.device(plan.device),
                                lambda msg: print(f"opsd evaluate: {msg}", file=sys.stderr))
        return backend.sampling_module(), backend.generate_options

    return build


def evaluate_base(params: Params, root: Path) -> dict[str, Any]:
    """Evaluate the base model and write ``reports/eval_base.json``; returns the report."""
    root = Path(root)
    values, digest, tasks_dir, tasks, base_dir = _prepare(params, root)
    progress = _progress("evaluate_base", ["base"], tasks, params.eval.backend)
    result = evaluate_model(base_dir, None, tasks, params.eval, tasks_dir, device=values["device"],
                            thinking=params.model.thinking, on_group=_on_group(progress, "base"),
                            sampler_factory=sampler_factory(params, values["device"]))
    report = {
        "settings": _settings_block(values, digest),
        "model": {"base": _rel(base_dir, root)},
        "elapsed_s": result.elapsed_s,
        # how long each group of tasks took: the candidate stage's estimate of its own time (same settings)
        "group_s": result.group_s,
        "tasks": {name: t.to_dict() for name, t in result.tasks.items()},
    }
    write_json(Layout.of(params, root).eval_base_report, report)
    return report


def read_candidate(params: Params, root: Path, base_dir: str) -> tuple[str, str | None, dict[str, Any]]:
    """(pretrained dir, adapter dir or None, metadata) of the trained candidate."""
    layout = Layout.of(params, root)
    cand_dir, meta_path = layout.candidate, layout.candidate_meta
    if not meta_path.is_file():
        raise EvalError(f"no candidate at {cand_dir} ({meta_path.name} missing): run `opsd train` first")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    trained_on = meta.get("base_model")
    if trained_on not in (params.model.base, base_dir):
        raise EvalError(
            f"candidate {cand_dir} was trained from base {trained_on!r}, but model.base is "
            f"{params.model.base!r}: evaluating it against a different base would be meaningless"
        )
    if meta.get("adapter", False):
        return base_dir, str(cand_dir), meta
    return str(cand_dir), None, meta


def _cached_base(path: Path, digest: str,
                 tasks: list[str]) -> tuple[dict[str, TaskEval], dict[str, float]] | None:
    """The base's results and its seconds per group of tasks (empty from a report older than them)."""
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        names = with_flexible(tasks)
        if report["settings"]["settings_hash"] != digest or not set(names) <= set(report["tasks"]):
            return None
        timings = {str(k): float(v) for k, v in report.get("group_s", {}).items()}
        return {name: TaskEval.from_dict(report["tasks"][name]) for name in names}, timings
    except (KeyError, TypeError, ValueError, AttributeError):
        return None  # an unreadable cache is re-evaluated, never trusted


def compare(base: TaskEval, cand: TaskEval, n: int, seed: int) -> dict[str, Any]:
    """Paired bootstrap over the problems both models were scored on (the same ones by construction)."""
    try:
        return compare_samples(base.samples, cand.samples, n, seed)
    except ValueError as err:
        raise EvalError(f"base and candidate: {err}") from None


def combine(base: dict[str, TaskEval], cand: ModelEval, n: int, seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, cand_task in cand.tasks.items():
        out[name] = {
            "base": base[name].to_dict(),
            "candidate": cand_task.to_dict(),
            "diff": compare(base[name], cand_task, n, seed),
        }
    return out


def evaluate_candidate(params: Params, root: Path) -> dict[str, Any]:
    """Evaluate the candidate (base + adapter), pair it with the base and write ``reports/eval.json``."""
    root = Path(root)
    values, digest, tasks_dir, tasks, base_dir = _prepare(params, root)
    pretrained, adapter, meta = read_candidate(params, root, base_dir)
    layout = Layout.of(params, root)
    cached = _cached_base(layout.eval_base_report, digest, tasks)
    progress = _progress("evaluate", ["candidate"] if cached else ["base", "candidate"], tasks,
                         params.eval.backend, cached[1] if cached else None)
    factory = sampler_factory(params, values["device"])
    if cached is not None:
        base, base_source = cached[0], "cache"
    else:
        base = evaluate_model(base_dir, None, tasks, params.eval, tasks_dir, device=values["device"],
                              thinking=params.model.thinking, on_group=_on_group(progress, "base"),
                              sampler_factory=factory).tasks
        base_source = "evaluated"
    cand = evaluate_model(pretrained, adapter, tasks, params.eval, tasks_dir, device=values["device"],
                          thinking=params.model.thinking, on_group=_on_group(progress, "candidate"),
                          sampler_factory=factory)
    report = {
        "settings": _settings_block(values, digest),
        "models": {
            "base": _rel(base_dir, root),
            "candidate": {"base": _rel(pretrained, root), "adapter": _rel(adapter, root) if adapter else None,
                          "content_hash": meta.get("content_hash")},
        },
        "base_source": base_source,
        "elapsed_s": cand.elapsed_s,
        "tasks": combine(base, cand, params.eval.bootstrap_samples, params.eval.seed),
    }
    write_json(layout.eval_report, report)
    # each task's candidate score and gain: a column each in `dvc metrics show` (intervals: eval.json, the plot)
    write_metrics(layout.reports, "eval", {task: {"candidate": row["candidate"], "gain": row["gain"]}
                                           for task, row in task_summary(report).items()})
    return report


def evaluate(params: Params, root: Path, which: str = "candidate") -> dict[str, Any]:
    """``base``: evaluate the base model alone (its own cached DVC stage); ``candidate``: compare."""
    configure_threads(params.train.threads)
    if which == "base":
        return evaluate_base(params, root)
    report = evaluate_candidate(params, root)
    # the DVC plot: base and candidate per task with their intervals, accuracies and log-likelihoods on
    # their own axes, as a PNG (dvc plots show renders it without fetching a charting library)
    card.plot_eval(report, Layout.of(params, root).eval_plot)
    return report
