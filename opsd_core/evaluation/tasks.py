"""The project's own lm-eval tasks, generated as YAML configs over local JSONL files.

Each task gets a sanitised copy of its rows (``id``, ``problem``, ``answer`` only, all strings) beside
its YAML: ``datasets`` infers one schema per file, and free-form ``meta`` objects that differ between
rows would otherwise break loading. The copy is keyed by content in the settings hash, so a cached
base evaluation is never reused over different data.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from opsd_core.config import EvalConfig
from opsd_core.data.verify import extract_answer
from opsd_core.evaluation.errors import EvalDataError, EvalTaskError
from opsd_core.evaluation.metrics import EXACT_MATCH, EXACT_MATCH_FLEX, HAS_ANSWER, LOGLIKELIHOOD
from opsd_core.io import atomic_write

VAL_TASK = "opsd_val"
GSM8K_TASK = "opsd_gsm8k100"
# the same problems scored by log-likelihood: the student's mean log-probability per token of the
# verified reference solution, given exactly its prompt (what OPSD moves; no generation, cheap on CPU)
VAL_LL_TASK = "opsd_val_ll"
GSM8K_LL_TASK = "opsd_gsm8k100_ll"
# only the final answer line ("#### 42"), behind the student's prompt and the rest of the verified solution:
# does the model conclude the right number, apart from how it words the reasoning
VAL_ANSWER_TASK = "opsd_val_answer_ll"
GSM8K_ANSWER_TASK = "opsd_gsm8k100_answer_ll"
ANSWER_TASKS: tuple[str, ...] = (VAL_ANSWER_TASK, GSM8K_ANSWER_TASK)
LL_TASKS: tuple[str, ...] = (VAL_LL_TASK, GSM8K_LL_TASK, *ANSWER_TASKS)
GENERATION_TASKS: tuple[str, ...] = (VAL_TASK, GSM8K_TASK)
OWN_TASKS: tuple[str, ...] = (*GENERATION_TASKS, *LL_TASKS)
# the own tasks over the prepared val split; the others are over the bundled GSM8K set
VAL_SPLIT_TASKS: tuple[str, ...] = (VAL_TASK, VAL_LL_TASK, VAL_ANSWER_TASK)
# each generation task's report also holds, from the same completions, exact match on the last number
FLEX_SUFFIX = "_flex"
# lm-eval filter that keeps all k samples of a problem (its default keeps only the first).
SAMPLES_FILTER = "all_samples"
# ChatML end of turn; lm-eval also stops at the tokenizer's own eos.
STOP_SEQUENCES: tuple[str, ...] = ("<|im_end|>",)
_METRICS_MODULE = "opsd_core.evaluation.metrics"


class _FunctionRef(str):
    """A YAML scalar emitted with lm-eval's ``!function`` tag."""


class _TaskDumper(yaml.SafeDumper):
    pass


_TaskDumper.add_representer(
    _FunctionRef, lambda dumper, value: dumper.represent_scalar("!function", str(value))
)


def sampling_kwargs(cfg: EvalConfig) -> dict[str, Any]:
    """The eval settings as lm-eval generation kwargs (greedy when temperature is 0), for our tasks and
    for standard ``generate_until`` tasks alike."""
    sample = cfg.temperature > 0
    return {"max_gen_toks": cfg.max_new_tokens, "do_sample": sample,
            "temperature": float(cfg.temperature) if sample else 0.0}


def generation_kwargs(cfg: EvalConfig) -> dict[str, Any]:
    """lm-eval ``generation_kwargs`` of our own generation tasks: the sampling settings plus our stops."""
    return {"until": list(STOP_SEQUENCES), **sampling_kwargs(cfg)}


def task_config(name: str, data_file: Path, cfg: EvalConfig) -> dict[str, Any]:
    """The lm-eval task config (as a dict) for one own task over one JSONL file."""
    k = cfg.samples_per_problem
    return {
        "task": name,
        "dataset_path": "json",
        # absolute: lm-eval resolves relative data_files against the working directory
        "dataset_kwargs": {"data_files": {"test": str(Path(data_file).resolve())}},
        "test_split": "test",
        "output_type": "generate_until",
        "num_fewshot": 0,
        "doc_to_text": _FunctionRef(f"{_METRICS_MODULE}.doc_to_text"),
        "doc_to_target": "answer",
        "process_results": _FunctionRef(f"{_METRICS_MODULE}.process_results"),
        "generation_kwargs": generation_kwargs(cfg),
        "repeats": k,
        "filter_list": [{"name": SAMPLES_FILTER, "filter": [{"function": "take_first_k", "k": k}]}],
        "metric_list": [
            {"metric": EXACT_MATCH, "aggregation": "mean", "higher_is_better": True},
            {"metric": EXACT_MATCH_FLEX, "aggregation": "mean", "higher_is_better": True},
            {"metric": HAS_ANSWER, "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }


def ll_task_config(name: str, data_file: Path) -> dict[str, Any]:
    """The lm-eval config of a log-likelihood task: one ``loglikelihood`` request per problem, the reference
    solution as the continuation of the student's chat prompt (no delimiter: the template ends the prompt).

    lm-eval moves a context's trailing whitespace into the continuation, so the summed log-probability
    also holds the template's last token (the newline after ``assistant``), predicted from the prompt
    before it: a term a chat model puts at ~0 nats, the same kind for base and candidate. Every solution
    token is scored behind exactly the student's prompt. (Two continuations per problem, to subtract that
    term, would need an empty one, which lm-eval's checks refuse.)

    The answer tasks score only the final answer line: the solution's earlier lines are the start of the
    assistant's turn (lm-eval's ``gen_prefix``, rendered with the chat template's continue-final-message),
    the answer line its continuation.
    """
    config: dict[str, Any] = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(data_file).resolve())}},
        "test_split": "test",
        "output_type": "loglikelihood",
        "num_fewshot": 0,
        "doc_to_text": _FunctionRef(f"{_METRICS_MODULE}.doc_to_text"),
        "doc_to_target": ll_target(name),
        "target_delimiter": "",
        "process_results": _FunctionRef(f"{_METRICS_MODULE}.process_loglikelihood"),
        "metric_list": [{"metric": LOGLIKELIHOOD, "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    if name in ANSWER_TASKS:
        config["gen_prefix"] = "head"
    return config


def ll_target(name: str) -> str:
    """The row field a log-likelihood task scores (its token count is the per-token denominator)."""
    return "answer_line" if name in ANSWER_TASKS else "solution"


def answer_split(solution: str) -> tuple[str, str]:
    """(the solution up to its final answer line, that line): the line of the last ``####``, else of the
    last ``\\boxed``; the answer tasks score the line behind the rest."""
    text = solution.strip()
    cut = text.rfind("####")
    if cut < 0:
        cut = text.rfind("\\boxed")
    if cut < 0:
        raise ValueError("the solution has no final answer line ('####' or \\boxed)")
    start = text.rfind("\n", 0, cut) + 1
    return text[:start], text[start:]


def with_flexible(names: list[str]) -> list[str]:
    """``names`` and, after each own generation task, its flexible-match entry (what a report holds)."""
    out: list[str] = []
    for name in names:
        out.append(name)
        if name in GENERATION_TASKS:
            out.append(name + FLEX_SUFFIX)
    return out


def _row_answer(row: Mapping[str, Any]) -> str | None:
    answer = row.get("answer")
    if isinstance(answer, (str, int, float)) and str(answer).strip():
        return str(answer).strip()
    solution = row.get("solution")
    return extract_answer(solution) if isinstance(solution, str) else None


def sanitized_rows(task: str, path: Path, solution: bool = False) -> list[dict[str, str]]:
    """Rows of ``path`` reduced to ``id``, ``problem``, ``answer`` (and ``solution``, ``head``, ``answer_line``:
    the log-likelihood tasks' targets), all strings; a clear error otherwise."""
    if not path.is_file():
        raise EvalDataError(f"task {task!r}: its data file {path} does not exist (run `opsd prepare`?)")
    rows: list[dict[str, str]] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvalDataError(f"task {task!r}: {path}:{lineno} is not valid JSON ({err})") from None
            problem = row.get("problem") if isinstance(row, dict) else None
            if not isinstance(problem, str) or not problem.strip():
                raise EvalDataError(f"task {task!r}: {path}:{lineno} has no 'problem' text")
            answer = _row_answer(row)
            if answer is None:
                raise EvalDataError(f"task {task!r}: {path}:{lineno} has no 'answer' (nor one in 'solution')")
            row_id = row.get("id")
            clean = {"id": str(row_id) if row_id not in (None, "") else f"line{lineno}", "problem": problem,
                     "answer": answer}
            if solution:
                text = row.get("solution")
                if not isinstance(text, str) or not text.strip():
                    raise EvalDataError(f"task {task!r}: {path}:{lineno} has no 'solution' text to score")
                clean["solution"] = text.strip()
            if task in ANSWER_TASKS:
                try:
                    clean["head"], clean["answer_line"] = answer_split(clean["solution"])
                except ValueError as err:
                    raise EvalDataError(f"task {task!r}: {path}:{lineno} field 'solution': {err}") from None
            rows.append(clean)
    if not rows:
        raise EvalDataError(f"task {task!r}: its data file {path} has no rows")
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        # per-sample results are keyed by id: keep keys unique and stable
        for i, r in enumerate(rows):
            r["id"] = f"{r['id']}#{i}"
    return rows


def data_files(val_path: Path, gsm8k_path: Path) -> dict[str, Path]:
    """Each own task's data file: the prepared val split or the bundled GSM8K set."""
    return {name: Path(val_path) if name in VAL_SPLIT_TASKS else Path(gsm8k_path) for name in OWN_TASKS}


def own_task_names(names: list[str]) -> list[str]:
    """The own tasks among ``names``; anything else must go to ``eval.extra_tasks``."""
    unknown = [n for n in names if n not in OWN_TASKS]
    if unknown:
        raise EvalTaskError(
            f"unknown own task(s) {unknown} in eval.tasks (own tasks: {list(OWN_TASKS)}); "
            "standard lm-eval tasks such as 'gsm8k' belong in eval.extra_tasks"
        )
    return list(dict.fromkeys(names))


def write_task_yamls(tasks_dir: Path, val_path: Path, gsm8k_path: Path, cfg: EvalConfig) -> list[str]:
    """Write the YAML configs (and their data copies) of the own tasks named in ``cfg.tasks``.

    Returns the task names written. Raises :class:`EvalDataError` naming the task when its data
    file is missing, empty or malformed, and :class:`EvalTaskError` for names that are not own tasks.
    """
    sources = data_files(val_path, gsm8k_path)
    names = own_task_names(cfg.tasks)
    tasks_dir = Path(tasks_dir)
    tasks_dir.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    for name in names:
        rows = sanitized_rows(name, sources[name], solution=name in LL_TASKS)
        data_file = tasks_dir / f"{name}.jsonl"
        atomic_write(data_file, "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows))
        config = ll_task_config(name, data_file) if name in LL_TASKS else task_config(name, data_file, cfg)
        text = yaml.dump(config, Dumper=_TaskDumper, sort_keys=False, allow_unicode=True)
        atomic_write(tasks_dir / f"{name}.yaml", text)
        written.append(name)
    return written
