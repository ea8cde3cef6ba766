"""The promotion gate: a pure decision over evaluation reports (no MLflow, no I/O).

The candidate is promoted to ``champion`` only if, on the primary task, it beats the base model *and*
the current champion by at least ``margin`` with the paired-bootstrap 95% lower bound above zero, and
no guard task drops below the base score by more than its tolerance. Anything that cannot be checked
(missing task, champion evaluated under other settings) blocks promotion: the gate fails closed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opsd_core.config import RegistryConfig
from opsd_core.evaluation.bootstrap import compare_samples

# scores are means of 0/1 outcomes; equality at the margin must not fail on rounding
_EPS = 1e-12


@dataclass(frozen=True)
class ChampionEvidence:
    """What the gate knows about the current champion.

    ``report`` is the eval.json stored with the champion's run (None if it could not be read).
    """

    version: str
    content_hash: str | None
    report: Mapping[str, Any] | None


def paired_diff(
    base: Mapping[str, list[float]], cand: Mapping[str, list[float]], n_boot: int, seed: int,
) -> tuple[dict[str, Any] | None, str]:
    """(paired bootstrap of cand - base, "") or (None, why the two cannot be paired)."""
    if not base or not cand:
        return None, "no per-sample results to compare"
    try:
        return dict(compare_samples(base, cand, n_boot, seed)), ""
    except ValueError as err:
        return None, str(err)


def _fmt(d: Mapping[str, Any]) -> str:
    return f"{d['mean_diff']:+.4f} (95% CI [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}])"


def _beats(d: Mapping[str, Any], margin: float) -> bool:
    return float(d["mean_diff"]) >= margin - _EPS and float(d["ci_low"]) > 0.0


def _check_base(primary: Mapping[str, Any], cfg: RegistryConfig, n_boot: int, seed: int) -> dict[str, Any]:
    diff = primary.get("diff")
    if not diff or "ci_low" not in diff:  # older or partial report: recompute from the samples
        diff, why = paired_diff(primary["base"].get("samples", {}), primary["candidate"].get("samples", {}),
                                n_boot, seed)
        if diff is None:
            return {"passed": False, "reason": f"vs base: {why}"}
    passed = _beats(diff, cfg.margin)
    verb = "beats" if passed else "does not beat"
    return {
        "passed": passed,
        "base_score": float(primary["base"]["score"]),
        "candidate_score": float(primary["candidate"]["score"]),
        **{k: float(diff[k]) for k in ("mean_diff", "ci_low", "ci_high") if k in diff},
        "reason": f"vs base: {_fmt(diff)} {verb} margin {cfg.margin:g} with lower bound > 0",
    }


def _check_champion(
    report: Mapping[str, Any], champion: ChampionEvidence | None, candidate_hash: str | None,
    cfg: RegistryConfig, n_boot: int, seed: int,
) -> dict[str, Any]:
    if champion is None:
        return {"passed": True, "status": "no_champion", "reason": "vs champion: no current champion"}
    tag = f"champion v{champion.version}"
    base = {"champion_version": champion.version}
    if candidate_hash and champion.content_hash == candidate_hash:
        return {**base, "passed": True, "status": "same",
                "reason": f"vs champion: candidate is {tag} itself"}
    if champion.report is None:
        return {**base, "passed": False, "status": "cannot_compare",
                "reason": f"vs champion: cannot compare, {tag} has no stored eval report"}
    ours = report.get("settings", {}).get("settings_hash")
    theirs = champion.report.get("settings", {}).get("settings_hash")
    if ours is None or ours != theirs:
        return {**base, "passed": False, "status": "cannot_compare",
                "reason": f"vs champion: cannot compare, {tag} was evaluated with other settings "
                          f"({theirs} vs {ours})"}
    champ_task = champion.report.get("tasks", {}).get(cfg.primary_task)
    if not champ_task:
        return {**base, "passed": False, "status": "cannot_compare",
                "reason": f"vs champion: cannot compare, {tag} has no {cfg.primary_task} results"}
    diff, why = paired_diff(champ_task["candidate"].get("samples", {}),
                            report["tasks"][cfg.primary_task]["candidate"].get("samples", {}), n_boot, seed)
    if diff is None:
        return {**base, "passed": False, "status": "cannot_compare",
                "reason": f"vs champion: cannot compare with {tag}: {why}"}
    passed = _beats(diff, cfg.margin)
    verb = "beats" if passed else "does not beat"
    return {
        **base, "passed": passed, "status": "compared",
        "champion_score": float(champ_task["candidate"]["score"]),
        **{k: diff[k] for k in ("mean_diff", "ci_low", "ci_high", "p_better", "n_problems")},
        "reason": f"vs {tag}: {_fmt(diff)} {verb} margin {cfg.margin:g} with lower bound > 0",
    }


def _check_guards(tasks: Mapping[str, Any], cfg: RegistryConfig) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for task, tol in sorted(cfg.guard_tasks.items()):
        res = tasks.get(task)
        if not res:
            out[task] = {"passed": False, "reason": f"guard {task}: missing from the eval report"}
            continue
        b, c = float(res["base"]["score"]), float(res["candidate"]["score"])
        passed = c >= b - tol - _EPS
        word = "within" if passed else "beyond"
        out[task] = {
            "passed": passed, "base_score": b, "candidate_score": c, "tolerance": tol,
            "reason": f"guard {task}: {c:.4f} vs base {b:.4f}, change {c - b:+.4f} {word} tolerance {tol:g}",
        }
    return out


def decide(
    report: Mapping[str, Any], cfg: RegistryConfig, champion: ChampionEvidence | None = None,
    candidate_hash: str | None = None, n_boot: int = 1000, seed: int = 0,
) -> dict[str, Any]:
    """Gate verdict ``{promote, reasons, checks}`` for the candidate in ``report`` (an eval.json dict)."""
    tasks = report.get("tasks", {})
    primary = tasks.get(cfg.primary_task)
    checks: dict[str, Any] = {"primary_task": cfg.primary_task, "margin": cfg.margin}
    if not primary:
        checks["vs_base"] = {"passed": False,
                             "reason": f"vs base: primary task {cfg.primary_task} missing from the eval report"}
        checks["vs_champion"] = {"passed": False, "status": "cannot_compare",
                                 "reason": "vs champion: no primary task results"}
    else:
        checks["vs_base"] = _check_base(primary, cfg, n_boot, seed)
        checks["vs_champion"] = _check_champion(report, champion, candidate_hash, cfg, n_boot, seed)
    checks["guards"] = _check_guards(tasks, cfg)
    parts = [checks["vs_base"], checks["vs_champion"], *checks["guards"].values()]
    promote = all(p["passed"] for p in parts)
    reasons = [("PASS " if p["passed"] else "FAIL ") + p["reason"] for p in parts]
    return {"promote": promote, "reasons": reasons, "checks": checks}
