"""The gate's decision as a small table: what was compared, by how much, with what interval, pass or fail.

The same rows are printed by ``opsd run`` and ``opsd status`` and written as the MLflow run's description.
"""

from __future__ import annotations

import json
from typing import Any

HEADER = ("check", "base", "candidate", "difference", "95% CI", "result")


def _num(value: Any) -> str:
    return f"{float(value):.4f}" if isinstance(value, (int, float)) else ""


def rows(verdict: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per check of a verdict (:func:`opsd_core.registry.gate.decide`)."""
    checks = verdict.get("checks") or {}
    out: list[tuple[str, ...]] = []
    base = checks.get("vs_base") or {}
    if base:
        b, c = base.get("base_score"), base.get("candidate_score")
        ci = (f"[{base['ci_low']:+.4f}, {base['ci_high']:+.4f}]"
              if base.get("ci_low") is not None and base.get("ci_high") is not None else "")
        out.append((f"vs base: {checks.get('primary_task')}", _num(b), _num(c),
                    f"{base['mean_diff']:+.4f}" if base.get("mean_diff") is not None else "", ci,
                    "pass" if base.get("passed") else "FAIL"))
    champ = checks.get("vs_champion") or {}
    if champ:
        out.append(("vs champion", "", "", f"{champ['mean_diff']:+.4f}" if champ.get("mean_diff") is not None else "",
                    f"[{champ['ci_low']:+.4f}, {champ['ci_high']:+.4f}]" if champ.get("ci_low") is not None else
                    champ.get("status", "").replace("_", " "), "pass" if champ.get("passed") else "FAIL"))
    for task, g in sorted((checks.get("guards") or {}).items()):
        b, c = g.get("base_score"), g.get("candidate_score")
        diff = f"{c - b:+.4f}" if isinstance(b, (int, float)) and isinstance(c, (int, float)) else ""
        out.append((f"guard: {task}", _num(b), _num(c), diff, f"tolerance {g.get('tolerance')}",
                    "pass" if g.get("passed") else "FAIL"))
    return out


def render(verdict: dict[str, Any], markdown: bool = False) -> str:
    """The verdict as a fixed-width table (or a Markdown one), then the decision in one line."""
    table = [HEADER, *rows(verdict)]
    decision = "promote to champion" if verdict.get("promote") else "not promoted"
    if markdown:
        lines = ["| " + " | ".join(r) + " |" for r in table]
        lines.insert(1, "|" + "---|" * len(HEADER))
        return "\n".join([*lines, "", f"**Gate: {decision}.**"])
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table]
    return "\n".join([*lines, f"gate: {decision}"])


def _interval_words(diff: dict[str, Any]) -> str:
    lo, hi = diff.get("ci_low"), diff.get("ci_high")
    if lo is None or hi is None:
        return "no interval"
    where = ("better: the whole interval is above zero" if lo > 0 else
             "worse: the whole interval is below zero" if hi < 0 else
             "no difference it can detect: the interval includes zero")
    return f"{diff.get('mean_diff', 0.0):+.4f} [{lo:+.4f}, {hi:+.4f}], {where}"


def plain_words(verdict: dict[str, Any]) -> list[str]:
    """The gate's checks as sentences, for a reader who does not know the table: what each compared, and
    whether it could tell the models apart at all."""
    checks = verdict.get("checks") or {}
    out = []
    base = checks.get("vs_base") or {}
    if base:
        out.append(f"vs base on {checks.get('primary_task')}: {_interval_words(base)} -> "
                   f"{'pass' if base.get('passed') else 'FAIL'}")
    champ = checks.get("vs_champion") or {}
    if champ.get("mean_diff") is not None:
        out.append(f"vs champion v{champ.get('champion_version')}: {_interval_words(champ)} -> "
                   f"{'pass' if champ.get('passed') else 'FAIL'}")
    elif champ:
        why = champ.get("reason") or f"vs champion: {str(champ.get('status', 'not compared')).replace('_', ' ')}"
        out.append(f"{why} -> {'pass' if champ.get('passed') else 'FAIL'}")
    for task, g in sorted((checks.get("guards") or {}).items()):
        b, c = g.get("base_score"), g.get("candidate_score")
        if b == 0 and c == 0:
            out.append(f"guard {task}: both models solve none of these, so it cannot tell them apart -> pass")
        elif isinstance(b, int | float) and isinstance(c, int | float):
            out.append(f"guard {task}: {b:.4f} -> {c:.4f}, "
                       + ("within" if g.get("passed") else "a drop beyond")
                       + f" the tolerance {g.get('tolerance')} -> {'pass' if g.get('passed') else 'FAIL'}")
    return out


def from_tag(value: str | None) -> dict[str, Any] | None:
    """A verdict stored as a version tag (``gate.verdict``), or None."""
    try:
        parsed = json.loads(value) if value else None
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None
