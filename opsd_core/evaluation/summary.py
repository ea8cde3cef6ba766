"""Each task of an evaluation report in a few numbers: what the DVC metrics file, the DVC plot and the
Prefect artifact all show, read from ``reports/eval.json`` in one place."""

from __future__ import annotations

from typing import Any


def task_summary(report: dict[str, Any]) -> dict[str, dict[str, float | int | None]]:
    """{task: base, candidate, gain (candidate - base), gain_ci_low, gain_ci_high, problems}, tasks sorted;
    a value the report does not hold (no paired difference) is None."""
    out: dict[str, dict[str, float | int | None]] = {}
    for task, entry in sorted(report.get("tasks", {}).items()):
        diff = entry.get("diff") or {}
        out[task] = {"base": entry["base"]["score"], "candidate": entry["candidate"]["score"],
                     "gain": diff.get("mean_diff"), "gain_ci_low": diff.get("ci_low"),
                     "gain_ci_high": diff.get("ci_high"), "problems": entry["candidate"].get("n")}
    return out
