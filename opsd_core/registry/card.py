"""Human-facing artifacts of a registered candidate: the model card and two PNG plots."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from opsd_core.evaluation.bootstrap import problem_means
from opsd_core.evaluation.metrics import EXACT_MATCH, EXACT_MATCH_FLEX, HAS_ANSWER
from opsd_core.evaluation.tasks import GENERATION_TASKS, LL_TASKS, with_flexible
from opsd_core.io import atomic_write

CURVE_PANELS = ("loss", "kl", "clipped_frac", "completion_len", "ended_frac", "grad_norm")


def read_curve(path: Path) -> list[dict[str, float]]:
    """train_curve.csv -> rows of floats (empty cells and non-numbers are skipped)."""
    if not path.is_file():
        return []
    rows: list[dict[str, float]] = []
    with path.open(newline="") as fh:
        for raw in csv.DictReader(fh):
            row: dict[str, float] = {}
            for key, value in raw.items():
                try:
                    row[key] = float(value)
                except (TypeError, ValueError):
                    continue
            if "step" in row:
                rows.append(row)
    return rows


# per-problem values of these metrics are fractions (solved samples out of k, 0/1 answers): their mean and
# its interval lie in [0, 1]; every other metric (log-likelihood per token, and any metric of a standard
# lm-eval task not named here) is shown unbounded
FRACTION_METRICS = frozenset({EXACT_MATCH, EXACT_MATCH_FLEX, HAS_ANSWER, "acc", "acc_norm"})
UNIT_RANGE = (0.0, 1.0)


def score_bounds(task: str, metric: str | None = None) -> tuple[float, float] | None:
    """The range a task's score can take: ``(0, 1)`` for an accuracy or exact match, None (unbounded) for a
    log-likelihood (the own ``*_ll`` tasks: mean log-probability per token, negative) or an unknown metric.

    ``metric`` is the report's name for it (``exact_match,all_samples``, ``loglikelihood_per_token``,
    ``acc,none``); without one, the own task names decide. The one rule every shown interval follows."""
    if task in LL_TASKS:
        return None
    if metric:
        return UNIT_RANGE if metric.split(",")[0] in FRACTION_METRICS else None
    return UNIT_RANGE if task in with_flexible(list(GENERATION_TASKS)) else None


def score_interval(samples: Mapping[str, list[float]], z: float = 1.96,
                   bounds: tuple[float, float] | None = None) -> tuple[float, float, float]:
    """(mean, low, high) of the per-problem scores: normal interval on the mean of [P] problem means, cut to
    ``bounds`` (a bounded metric's range, :func:`score_bounds`) if given, else unbounded."""
    xs = list(problem_means(samples).values())
    if not xs:
        return math.nan, math.nan, math.nan
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, mean, mean
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    half = z * sd / math.sqrt(len(xs))
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(bounds[0], low), min(bounds[1], high)
    return mean, low, high


def task_interval(task: str, result: Mapping[str, Any]) -> tuple[float, float, float]:
    """(mean, low, high) of one model's result on ``task`` (a report's ``tasks.<task>.base`` or ``.candidate``),
    bounded as the task's metric is."""
    return score_interval(result.get("samples") or {}, bounds=score_bounds(task, result.get("metric")))


def metric_name(task: str, result: Mapping[str, Any]) -> str:
    """A short name of what a task's score measures, for tables and axes."""
    metric = str(result.get("metric") or "").split(",")[0]
    if metric:
        return metric
    return "log-likelihood per token" if score_bounds(task) is None else "accuracy"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def plot_training_curve(rows: list[dict[str, float]], path: Path) -> Path:
    plt = _pyplot()
    panels = [k for k in CURVE_PANELS if any(k in r for r in rows)] or ["loss"]
    cols = 3
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(12, 3.2 * math.ceil(len(panels) / cols)),
                             squeeze=False)
    for ax, key in zip(axes.flat, panels, strict=False):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("OPSD training")
    fig.tight_layout()
    _save(plt, fig, path)
    return path


def _save(plt: Any, fig: Any, path: Path) -> None:
    """A figure as a PNG, written atomically (these are DVC plots: a reader never sees half a file)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    atomic_write(Path(path), buffer.getvalue())


def eval_groups(report: Mapping[str, Any]) -> list[tuple[str, bool, list[str]]]:
    """(axis title, bounded, tasks) of the report's tasks: the bounded scores (accuracy, exact match) apart from
    the unbounded ones (log-likelihood per token), which do not share a scale; empty groups left out."""
    tasks = report.get("tasks", {})
    bounded: list[str] = []
    unbounded: list[str] = []
    for t in sorted(tasks):
        (bounded if score_bounds(t, _side(tasks[t]).get("metric")) is not None else unbounded).append(t)
    ll = all(metric_name(t, _side(tasks[t])).startswith("log") for t in unbounded)
    return [(title, kind, ts) for title, kind, ts in (
        ("accuracy / exact match", True, bounded),
        ("log-likelihood per token (nats)" if ll else "unbounded scores", False, unbounded),
    ) if ts]


def _side(entry: Mapping[str, Any]) -> Mapping[str, Any]:
    return entry.get("candidate") or entry.get("base") or {}


def _errors(mids: list[float], lows: list[float], highs: list[float]) -> list[list[float]]:
    """Matplotlib's two-sided error lengths [[below], [above]] of intervals around ``mids`` (0 where unknown)."""
    def length(x: float) -> float:
        return 0.0 if math.isnan(x) else max(0.0, x)

    return [[length(m - lo) for m, lo in zip(mids, lows, strict=True)],
            [length(hi - m) for m, hi in zip(mids, highs, strict=True)]]


def eval_figure(report: Mapping[str, Any]) -> Any:
    """The evaluation figure: one row of axes per kind of score (:func:`eval_groups`); left, base and candidate
    with their 95% intervals (:func:`task_interval`), right, candidate - base with its paired bootstrap 95% CI.
    Tasks run down the y axis, so their names stay readable however many there are."""
    plt = _pyplot()
    groups = eval_groups(report) or [("scores", False, [])]
    heights = [max(2, len(ts)) for _, _, ts in groups]
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 1.5 * len(groups) + 0.55 * sum(heights) + 0.8),
                             squeeze=False, gridspec_kw={"height_ratios": heights, "width_ratios": [3, 2]})
    offset = 0.17
    for (title, bounded, tasks), (left, right) in zip(groups, axes, strict=True):
        rows = range(len(tasks))
        for who, shift, colour in (("base", -offset, "tab:gray"), ("candidate", offset, "tab:blue")):
            mids, lows, highs = [], [], []
            for t in tasks:
                res = report["tasks"][t][who]
                m, lo, hi = task_interval(t, res)
                mids.append(float(res.get("score", m)) if math.isnan(m) else m)
                lows.append(lo)
                highs.append(hi)
            if tasks:
                left.errorbar(mids, [r + shift for r in rows], xerr=_errors(mids, lows, highs), fmt="o", capsize=4,
                              color=colour, label=who)
        if bounded:
            left.set_xlim(-0.03, 1.03)
        left.set_title(f"{title}: score (95% interval)")
        left.set_xlabel("fraction solved" if bounded else
                        "mean log-probability per token (nats)" if title.startswith("log") else "score")
        diffs = [report["tasks"][t].get("diff") or {} for t in tasks]
        shown = [(r, d) for r, d in zip(rows, diffs, strict=True) if "mean_diff" in d]
        if shown:
            mids = [float(d["mean_diff"]) for _, d in shown]
            lows = [float(d.get("ci_low", math.nan)) for _, d in shown]
            highs = [float(d.get("ci_high", math.nan)) for _, d in shown]
            right.errorbar(mids, [r for r, _ in shown], xerr=_errors(mids, lows, highs), fmt="o", capsize=4,
                           color="tab:green")
        right.axvline(0.0, color="black", linewidth=0.8)
        right.set_title("candidate - base (paired bootstrap 95% CI)")
        right.set_xlabel("difference")
        for ax in (left, right):
            ax.set_yticks(list(rows), tasks if ax is left else [""] * len(tasks))
            ax.set_ylim(max(1, len(tasks)) - 0.5, -0.5)  # first task on top
            ax.grid(axis="x", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:  # once, above the plots, where it covers no point
        fig.legend(handles, labels, loc="upper left", ncol=2, frameon=False)
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - 0.35 / fig.get_figheight()))
    return fig


def plot_eval(report: Mapping[str, Any], path: Path) -> Path:
    """Write :func:`eval_figure` as a PNG."""
    plt = _pyplot()
    _save(plt, eval_figure(report), path)
    return path


SCORES_NOTE = ("Each score is the mean over problems, with a normal 95% interval on that mean in brackets: cut to "
               "[0, 1] for accuracy and exact match, unbounded for log-likelihood (the mean log-probability per "
               "token of the reference text, in nats: negative, higher is better). The 95% CI of candidate - base is "
               "a paired bootstrap over problems.")


def score_cell(task: str, result: Mapping[str, Any]) -> str:
    """``score [low, high]`` of one model's result on ``task`` (:func:`task_interval`); the score alone when
    the result holds no per-problem samples."""
    _, lo, hi = task_interval(task, result)
    score = f"{float(result['score']):.4f}"
    return score if math.isnan(lo) else f"{score} [{lo:.4f}, {hi:.4f}]"


def _num(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def model_card(
    candidate: Mapping[str, Any], report: Mapping[str, Any], train: Mapping[str, Any],
    params_dump: Mapping[str, Any], lineage: Mapping[str, Any], verdict: Mapping[str, Any] | None,
    model_name: str,
) -> str:
    """Markdown card: base model, data version, params, scores with intervals, gate verdict, lineage.

    ``params_dump``: the settings that apply to the run, as the MLflow params hold them
    (:func:`opsd_core.stages.register.applicable_params`: no ``model.tiny`` unless the base is the tiny model)."""
    lines = [
        f"# {model_name}: OPSD candidate `{str(candidate.get('content_hash', ''))[:16]}`", "",
        "On-policy self-distillation of the base model below"
        + (", stored as a peft LoRA adapter (load it onto the base)." if candidate.get("adapter") else "."),
        "", "## Base model", "",
        f"- spec: `{candidate.get('base_model')}`",
        f"- resolved path at training time: `{candidate.get('base_path')}`", "",
        "## Data", "",
        f"- data hash (prepared): `{candidate.get('data_hash')}`",
        f"- DVC md5 of raw traces: `{lineage.get('dvc_raw_md5')}`", "",
        "## Training", "",
    ]
    lines += [f"- {k}: {_num(v)}" for k, v in sorted(train.items()) if isinstance(v, int | float | str)]
    lines += ["", "## Parameters", "", f"params hash `{lineage.get('params_hash')}` "
              f"(training: `{candidate.get('params_hash')}`)", ""]
    for section in ("model", "lora", "opsd", "train", "eval", "registry"):
        if section in params_dump:
            lines.append(f"- **{section}**")
            lines += _nested(params_dump[section], depth=1)
    lines += ["", "## Scores", "", f"Evaluation settings hash `{report.get('settings', {}).get('settings_hash')}`.",
              "", SCORES_NOTE, "",
              "| task | metric | base | candidate | candidate - base | 95% CI | P(better) |",
              "|---|---|---|---|---|---|---|"]
    for task, res in sorted(report.get("tasks", {}).items()):
        cells = [f"{score_cell(task, res[who])} (n={res[who].get('n')})" for who in ("base", "candidate")]
        d = res.get("diff") or {}
        ci = f"[{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]" if "ci_low" in d else "-"
        lines.append(f"| {task} | {metric_name(task, _side(res))} | {cells[0]} | {cells[1]} | "
                     f"{_num(d.get('mean_diff', '-'))} | {ci} | {_num(d.get('p_better', '-'))} |")
    if verdict is not None:
        lines += ["", "## Promotion gate", "", f"**{'promoted' if verdict['promote'] else 'not promoted'}**", ""]
        lines += [f"- {r}" for r in verdict["reasons"]]
    software = train.get("versions") if isinstance(train.get("versions"), Mapping) else {}
    if software:
        lines += ["", "## Software", "", ", ".join(f"{k} {v}" for k, v in software.items()
                                                   if v and not k.startswith("lock_")),
                  "", f"- pinned stack (constraints.txt) sha256 prefix: `{software.get('lock_sha256')}`",
                  f"- installed versions that differ from it: {software.get('lock_differences')}"]
    lines += ["", "## Lineage", ""] + [f"- {k}: `{v}`" for k, v in sorted(lineage.items())]
    return "\n".join(lines) + "\n"


def _nested(section: Any, depth: int) -> list[str]:
    """A settings section as nested Markdown bullets, one setting per line."""
    pad = "  " * depth
    lines = []
    for key, value in section.items():
        if isinstance(value, Mapping) and value:
            lines.append(f"{pad}- {key}")
            lines += _nested(value, depth + 1)
        else:
            lines.append(f"{pad}- {key}: `{value}`")
    return lines
