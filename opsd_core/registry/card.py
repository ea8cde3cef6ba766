"""Human-facing artifacts of a registered candidate: the model card and two PNG plots."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from opsd_core.evaluation.bootstrap import problem_means

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


def score_interval(samples: Mapping[str, list[float]], z: float = 1.96) -> tuple[float, float, float]:
    """(mean, low, high) of the per-problem scores: normal interval on the mean of [P] problem means."""
    xs = list(problem_means(samples).values())
    if not xs:
        return math.nan, math.nan, math.nan
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, mean, mean
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    half = z * sd / math.sqrt(len(xs))
    return mean, max(0.0, mean - half), min(1.0, mean + half)


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
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_eval(report: Mapping[str, Any], path: Path) -> Path:
    """Per task: base vs candidate scores (95% intervals) and the paired difference with its CI."""
    plt = _pyplot()
    tasks = sorted(report.get("tasks", {}))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.5))
    width = 0.38
    for i, who in enumerate(("base", "candidate")):
        means, lows, highs = [], [], []
        for t in tasks:
            res = report["tasks"][t][who]
            m, lo, hi = score_interval(res.get("samples", {}))
            m = float(res.get("score", m))
            means.append(m)
            lows.append(max(0.0, m - lo) if not math.isnan(lo) else 0.0)
            highs.append(max(0.0, hi - m) if not math.isnan(hi) else 0.0)
        xs = [j + (i - 0.5) * width for j in range(len(tasks))]
        left.bar(xs, means, width, yerr=[lows, highs], capsize=4, label=who)
    left.set_xticks(range(len(tasks)), tasks)
    left.set_ylabel("score")
    left.set_title("scores (95% interval)")
    left.legend()
    diffs = [report["tasks"][t].get("diff") or {} for t in tasks]
    mids = [float(d.get("mean_diff", 0.0)) for d in diffs]
    err_lo = [max(0.0, m - float(d.get("ci_low", m))) for m, d in zip(mids, diffs, strict=True)]
    err_hi = [max(0.0, float(d.get("ci_high", m)) - m) for m, d in zip(mids, diffs, strict=True)]
    right.bar(range(len(tasks)), mids, yerr=[err_lo, err_hi], capsize=4, color="tab:green")
    right.axhline(0.0, color="black", linewidth=0.8)
    right.set_xticks(range(len(tasks)), tasks)
    right.set_title("candidate - base (paired bootstrap 95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _num(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def model_card(
    candidate: Mapping[str, Any], report: Mapping[str, Any], train: Mapping[str, Any],
    params_dump: Mapping[str, Any], lineage: Mapping[str, Any], verdict: Mapping[str, Any] | None,
    model_name: str,
) -> str:
    """Markdown card: base model, data version, params, scores with intervals, gate verdict, lineage."""
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
              "", "| task | base | candidate | candidate - base | 95% CI | P(better) |", "|---|---|---|---|---|---|"]
    for task, res in sorted(report.get("tasks", {}).items()):
        cells = []
        for who in ("base", "candidate"):
            m, lo, hi = score_interval(res[who].get("samples", {}))
            cells.append(f"{float(res[who]['score']):.4f} [{lo:.3f}, {hi:.3f}] (n={res[who].get('n')})")
        d = res.get("diff") or {}
        ci = f"[{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]" if "ci_low" in d else "-"
        lines.append(f"| {task} | {cells[0]} | {cells[1]} | {_num(d.get('mean_diff', '-'))} | {ci} | "
                     f"{_num(d.get('p_better', '-'))} |")
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
