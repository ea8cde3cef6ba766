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


def from_tag(value: str | None) -> dict[str, Any] | None:
    """A verdict stored as a version tag (``gate.verdict``), or None."""
    try:
        parsed = json.loads(value) if value else None
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None
