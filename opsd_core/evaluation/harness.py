"""Run lm-evaluation-harness on one model (base, or base + adapter) and collect per-sample results."""

from __future__ import annotations

import difflib
import functools
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoTokenizer

from opsd_core.config import EvalConfig
from opsd_core.evaluation.errors import EvalDataError, EvalTaskError
from opsd_core.evaluation.metrics import (
    EXACT_MATCH,
    EXACT_MATCH_FLEX,
    LOGLIKELIHOOD,
    flexible_correctness,
    sample_correctness,
)
from opsd_core.evaluation.tasks import (
    ANSWER_TASKS,
    FLEX_SUFFIX,
    LL_TASKS,
    OWN_TASKS,
    SAMPLES_FILTER,
    ll_target,
    sampling_kwargs,
)

if TYPE_CHECKING:  # opsd_lm imports lm-eval's hf model: loaded only when a model is
    from opsd_core.evaluation.opsd_lm import SamplerFactory

log = logging.getLogger(__name__)

# the two kinds of task group lm-eval runs per model (one simple_evaluate each): their costs per problem
# differ by orders of magnitude, so evaluation/progress.py estimates each kind from its own kind's timings
GENERATION_GROUP = "generation"
LL_GROUP = "log-likelihood"
# with lm-eval's hf model the answer-line requests run apart from the whole-solution ones: a problem's two
# requests are the same tokens cut in two places, and the hf model computes one forward for requests whose
# tokens are equal, then reads every one's continuation at the first one's cut (measured: -56 nats instead of
# -3.2 on one answer line). opsd's model (opsd_lm.py) reads each cut right, so there the two share one run.
ANSWER_GROUP = "answer log-likelihood"


@dataclass
class TaskEval:
    """One task's result for one model.

    ``samples`` maps a problem key (the row id for own tasks, lm-eval's doc id otherwise) to that
    problem's per-sample correctness (k values for own tasks). ``score`` is the mean over problems
    of the mean over samples.
    """

    score: float
    n: int
    k: int
    metric: str
    samples: dict[str, list[float]]
    lm_eval: dict[str, float] = field(default_factory=dict)
    example: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskEval:
        return cls(**data)


@dataclass
class ModelEval:
    model: dict[str, str | None]
    tasks: dict[str, TaskEval]
    elapsed_s: float
    group_s: dict[str, float] = field(default_factory=dict)  # seconds per task group (kind), as run

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": dict(self.model),
            "elapsed_s": self.elapsed_s,
            "tasks": {name: t.to_dict() for name, t in self.tasks.items()},
        }


@functools.lru_cache(maxsize=4)
def _cached_task_manager(include_path: str, include_defaults: bool, listing: tuple[Any, ...]) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def _task_manager(tasks_dir: Path, include_defaults: bool) -> Any:
    """A TaskManager over ``tasks_dir`` (plus lm-eval's built-ins when asked).

    Indexing the built-in tasks takes ~10 s, so managers are reused within a process; the key holds
    the directory's YAML names and mtimes so that rewritten task files are re-indexed.
    """
    path = Path(tasks_dir).resolve()
    listing = tuple(sorted((p.name, p.stat().st_mtime_ns) for p in path.glob("*.yaml")))
    return _cached_task_manager(str(path), include_defaults, listing)


def _unknown_task_error(name: str, known: list[str]) -> EvalTaskError:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return EvalTaskError(f"unknown lm-eval task {name!r}{hint}; own tasks are {list(OWN_TASKS)}")


def load_tasks(names: list[str], tasks_dir: Path) -> tuple[Any, dict[str, Any]]:
    """Build fresh lm-eval Task objects for ``names`` (own tasks from ``tasks_dir``, others built in).

    Loading a task loads its dataset, so data problems surface here, before any model is loaded.
    Returns the TaskManager to hand to ``simple_evaluate`` and the tasks by name.
    """
    if not Path(tasks_dir).is_dir():
        raise EvalTaskError(f"task directory {tasks_dir} does not exist (write_task_yamls first)")
    own_tm = _task_manager(tasks_dir, False)
    own = [n for n in names if n in own_tm.all_tasks]
    extra = [n for n in names if n not in own_tm.all_tasks]
    missing_own = [n for n in extra if n in OWN_TASKS]
    if missing_own:
        raise EvalTaskError(f"own task(s) {missing_own} have no generated YAML in {tasks_dir}")
    tm = own_tm
    if extra:
        tm = _task_manager(tasks_dir, True)
        for name in extra:
            if name not in tm.all_tasks:
                raise _unknown_task_error(name, tm.all_tasks)
    loaded: dict[str, Any] = {}
    for name in names:
        try:
            result = tm.load([name])
        except Exception as err:  # datasets raises ConnectionError, FileNotFoundError, ValueError...
            where = "its generated data file" if name in own else "its dataset"
            raise EvalDataError(
                f"task {name!r}: {where} is not available (offline, not cached, or unreadable): "
                f"{type(err).__name__}: {err}"
            ) from err
        loaded.update(result["tasks"])
    return tm, loaded


def _apply_generation_settings(task: Any, cfg: EvalConfig) -> None:
    """Give a standard generate_until task our sampling settings (keeping its own stop sequences)."""
    if task.get_config("output_type") != "generate_until":
        return
    task.set_config(key="generation_kwargs", value=sampling_kwargs(cfg), update=True)


def _numeric(values: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, bool) or "stderr" in key:
            continue
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def _own_task_eval(logged: list[dict[str, Any]], k: int, agg: dict[str, float]) -> tuple[TaskEval, TaskEval]:
    """(strict exact match, flexible exact match on the last number), from the same completions."""
    strict: dict[str, list[float]] = {}
    flexible: dict[str, list[float]] = {}
    example: dict[str, Any] = {}
    for ex in logged:
        if ex.get("filter") != SAMPLES_FILTER:
            continue
        doc = ex["doc"]
        completions = [str(c) for c in ex["filtered_resps"][0]]
        key = str(doc.get("id", ex["doc_id"]))
        strict[key] = [float(v) for v in sample_correctness(doc, completions)]
        flexible[key] = [float(v) for v in flexible_correctness(doc, completions)]
        if not example:
            example = {"id": key, "problem": doc["problem"], "prompt": ex["arguments"][0][0],
                       "completion": completions[0] if completions else "", "target": doc["answer"]}
    return (_task_eval(strict, k, f"{EXACT_MATCH},{SAMPLES_FILTER}", agg, example),
            _task_eval(flexible, k, f"{EXACT_MATCH_FLEX},{SAMPLES_FILTER}", agg, example))


LL_PER_TOKEN = "loglikelihood_per_token"


def _ll_task_eval(logged: list[dict[str, Any]], agg: dict[str, float], tokenizer: Any, target: str
                  ) -> TaskEval:
    """Per problem: the log-probability of the scored text (the ``target`` field: the reference solution or
    its answer line) divided by its token count (the model's own tokenizer, the same for base and
    candidate), so long and short texts weigh alike."""
    samples: dict[str, list[float]] = {}
    example: dict[str, Any] = {}
    for ex in logged:
        doc = ex["doc"]
        key = str(doc.get("id", ex["doc_id"]))
        tokens = max(1, len(tokenizer(doc[target], add_special_tokens=False)["input_ids"]))
        samples[key] = [float(ex[LOGLIKELIHOOD]) / tokens]
        if not example:
            example = {"id": key, "problem": doc["problem"], "prompt": ex["arguments"][0][0],
                       "target": doc[target], "tokens": tokens}
    return _task_eval(samples, 1, LL_PER_TOKEN, agg, example)


def _standard_task_eval(task: Any, logged: list[dict[str, Any]], agg: dict[str, float]) -> TaskEval:
    # Standard tasks keep their own filters and metrics: score the first filter's first metric.
    filters = [getattr(f, "name", None) for f in getattr(task, "_filters", [])]
    primary = filters[0] if filters else (logged[0]["filter"] if logged else "none")
    samples: dict[str, list[float]] = {}
    metric = ""
    example: dict[str, Any] = {}
    for ex in logged:
        if ex.get("filter") != primary:
            continue
        metric = metric or ex["metrics"][0]
        samples[str(ex["doc_id"])] = [float(ex[metric])]
        if not example:
            example = {"id": str(ex["doc_id"]), "prompt": ex["arguments"][0][0],
                       "completion": str(ex["filtered_resps"][0]), "target": str(ex["target"])}
    return _task_eval(samples, 1, f"{metric},{primary}", agg, example)


def _task_eval(samples: dict[str, list[float]], k: int, metric: str, agg: dict[str, float],
               example: dict[str, Any]) -> TaskEval:
    per_problem = [sum(v) / len(v) for v in samples.values() if v]
    score = sum(per_problem) / len(per_problem) if per_problem else 0.0
    return TaskEval(score=score, n=len(samples), k=k, metric=metric, samples=samples, lm_eval=agg,
                    example=example)


def model_args(model_path: str, adapter: str | None, cfg: EvalConfig, device: str,
               thinking: bool | None = None) -> dict[str, Any]:
    """lm-eval ``hf`` model arguments: the same for base and candidate except ``peft``.
    ``thinking``: ``model.thinking``, the chat template's switch, as in training."""
    args: dict[str, Any] = {
        "pretrained": str(model_path),
        "dtype": cfg.dtype,
        "device": device,
        "batch_size": cfg.batch_size,
    }
    if adapter:
        args["peft"] = str(adapter)
    if thinking is not None:
        args["enable_thinking"] = thinking
    return args


def task_groups(tasks: list[str], backend: str) -> list[tuple[str, list[str]]]:
    """(kind, task names) of each group :func:`evaluate_model` runs with ``backend`` (``eval.backend``), in its
    order; empty groups left out. Only the hf model needs the answer-line tasks in a run of their own."""
    names = list(dict.fromkeys(tasks))
    apart = backend == "hf"
    groups = [(GENERATION_GROUP, [n for n in names if n not in LL_TASKS]),
              (LL_GROUP, [n for n in names if n in LL_TASKS and not (apart and n in ANSWER_TASKS)]),
              (ANSWER_GROUP, [n for n in names if apart and n in ANSWER_TASKS])]
    return [(kind, group) for kind, group in groups if group]


def make_lm(model_path: str, adapter: str | None, cfg: EvalConfig, device: str, thinking: bool | None = None,
            sampler_factory: SamplerFactory | None = None) -> Any:
    """The lm-eval model ``cfg.backend`` names, loaded with the same ``hf`` arguments either way: lm-eval's
    ``hf`` model, or opsd's (``sampler_factory``: what it decodes with; default its portable back-end)."""
    args = model_args(model_path, adapter, cfg, device, thinking)
    if cfg.backend == "hf":
        from lm_eval.models.huggingface import HFLM

        return HFLM(**args)
    from opsd_core.evaluation.opsd_lm import OpsdLM

    return OpsdLM(**args, seed=cfg.seed, sampler_factory=sampler_factory)


def run_group(lm: Any, tasks: list[Any], task_manager: Any, limit: int | None, cfg: EvalConfig) -> dict[str, Any]:
    """One ``simple_evaluate`` over ``tasks`` (chat template on, per-sample results kept, seeded from
    ``cfg.seed`` so base and candidate draw the same random streams), in inference mode."""
    import lm_eval

    with torch.inference_mode():
        part = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=task_manager,
            limit=limit,
            apply_chat_template=True,
            fewshot_as_multiturn=True,
            log_samples=True,
            bootstrap_iters=0,  # the paired bootstrap is ours; lm-eval's stderr is not needed
            random_seed=cfg.seed,
            numpy_random_seed=cfg.seed,
            torch_random_seed=cfg.seed,
            fewshot_random_seed=cfg.seed,
        )
    if part is None:  # only non-zero ranks get None; evaluation runs in one process
        raise RuntimeError("lm-eval returned no results")
    return part


def evaluate_model(
    model_path: str, adapter: str | None, tasks: list[str], cfg: EvalConfig, tasks_dir: Path,
    device: str = "cpu", thinking: bool | None = None, on_group: Callable[[str, float], None] | None = None,
    sampler_factory: SamplerFactory | None = None,
) -> ModelEval:
    """Evaluate one model on ``tasks`` with lm-eval (chat template on, per-sample results kept).

    ``adapter`` is a PEFT adapter directory loaded on top of ``model_path`` (the candidate), or None.
    Seeds come from ``cfg.seed`` so base and candidate draw the same random streams. ``on_group(kind,
    seconds)`` is called as each group of tasks ends (the stage's progress line). ``sampler_factory``: what
    opsd's lm-eval model decodes with (``eval.backend: opsd``; see :func:`make_lm`).
    """
    if not tasks:
        raise EvalTaskError("no evaluation tasks configured (eval.tasks and eval.extra_tasks are empty)")
    if cfg.temperature == 0 and cfg.samples_per_problem > 1:
        log.warning("eval.samples_per_problem=%d with temperature 0: greedy samples are identical",
                    cfg.samples_per_problem)
    tm, loaded = load_tasks(list(dict.fromkeys(tasks)), tasks_dir)
    for name, task in loaded.items():
        if name not in OWN_TASKS:
            _apply_generation_settings(task, cfg)
    start = time.perf_counter()
    # one model for every group: the log-likelihood tasks take their own limit (cheap: no generation)
    lm = make_lm(model_path, adapter, cfg, device, thinking, sampler_factory)
    results: dict[str, Any] = {"results": {}, "samples": {}}
    group_s: dict[str, float] = {}
    for kind, group_names in task_groups(list(loaded), cfg.backend):
        group = {n: loaded[n] for n in group_names}
        limit = cfg.limit if kind == GENERATION_GROUP else cfg.ll_limit
        began = time.perf_counter()
        names = ", ".join(sorted(group))
        print(f"evaluating {'base + adapter' if adapter else Path(model_path).name}: {names} "
              f"({'all' if limit is None else limit} problems each) ...", file=sys.stderr, flush=True)
        part = run_group(lm, list(group.values()), tm, limit, cfg)
        results["results"].update(part.get("results", {}))
        results["samples"].update(part.get("samples", {}))
        group_s[kind] = round(time.perf_counter() - began, 3)
        print(f"evaluated {names} in {group_s[kind]:.0f} s", file=sys.stderr, flush=True)
        if on_group is not None:
            on_group(kind, group_s[kind])
    elapsed = time.perf_counter() - start
    out: dict[str, TaskEval] = {}
    tokenizer = None
    if any(name in LL_TASKS for name in loaded):
        tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    for name, task in loaded.items():
        logged = results.get("samples", {}).get(name, [])
        agg = _numeric(results["results"].get(name, {}))
        if name in LL_TASKS:
            out[name] = _ll_task_eval(logged, agg, tokenizer, ll_target(name))
        elif name in OWN_TASKS:
            out[name], out[name + FLEX_SUFFIX] = _own_task_eval(logged, cfg.samples_per_problem, agg)
        else:
            out[name] = _standard_task_eval(task, logged, agg)
    return ModelEval(model={"pretrained": str(model_path), "adapter": str(adapter) if adapter else None},
                     tasks=out, elapsed_s=round(elapsed, 3), group_s=group_s)
