"""``opsd status``: the champion and the challenger with their primary-task scores, gate decision and
lineage, and the latest alias moves. Read-only: it never creates a registry, and in the common case (the
embedded SQLite store, no dead pipeline run to mark FAILED) it reads without importing MLflow.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from opsd_core.config import Params
from opsd_core.layout import ALIASES, CHALLENGER, CHAMPION
from opsd_core.registry import decision, leases, sqlite_read
from opsd_core.registry.audit import audit_of, unaudited_champion
from opsd_core.registry.store import open_client, registered_model_exists, resolve_store, version_by_alias

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion


def _describe(mv: ModelVersion | sqlite_read.VersionRow | None, primary: str) -> dict[str, Any] | None:
    if mv is None:
        return None
    t = mv.tags
    return {"version": str(mv.version), "run_id": mv.run_id, "content_hash": t.get("content_hash"),
            "base_model": t.get("base_model"), "primary_task": primary,
            "scores": {k: t.get(f"score.{primary}.{k}") for k in ("base", "candidate", "mean_diff", "ci_low",
                                                                   "ci_high")},
            "gate_promote": t.get("gate.promote"),
            "verdict": decision.from_tag(t.get("gate.verdict")),
            "lineage": {k.removeprefix("lineage."): v for k, v in sorted(t.items()) if k.startswith("lineage.")}}


def status(params: Params, root: Path) -> dict[str, Any]:
    """Champion and challenger with their primary-task scores and lineage, plus recent alias moves."""
    root = Path(root).resolve()
    cfg, store = params.registry, resolve_store(params, root)
    if not store.exists():  # nothing registered yet; reading must not create an empty database
        return {"model_name": cfg.model_name, "tracking_uri": store.tracking_uri, CHAMPION: None,
                CHALLENGER: None, "recent_moves": []}
    primary = cfg.primary_task
    # the common case (no dead pipeline run to mark, the embedded store): read the aliases without importing
    # MLflow, ~2 s of a ~2.2 s command; marking a dead run FAILED, or any other store, goes through MLflow
    reaped: list[dict[str, Any]] = []
    found = None if leases.any_dead(store.state_dir) else sqlite_read.read_aliases(store.tracking_uri,
                                                                                  cfg.model_name, ALIASES)
    if found is None:
        client = open_client(store)
        reaped = leases.reap(store.state_dir, client)
        exists = registered_model_exists(client, cfg.model_name)
        found = {alias: version_by_alias(client, cfg.model_name, alias) if exists else None for alias in ALIASES}
    audit = audit_of(store, cfg.model_name)
    champion = found[CHAMPION]
    return {"model_name": cfg.model_name, "tracking_uri": store.tracking_uri, "reaped_runs": reaped,
            CHAMPION: _describe(champion, primary),
            CHALLENGER: _describe(found[CHALLENGER], primary),
            "unaudited": unaudited_champion(audit, None if champion is None else str(champion.version)),
            "recent_moves": audit[-5:]}


def render_status(st: dict[str, Any]) -> str:
    lines = [f"model {st['model_name']}  (tracking {st['tracking_uri']})"]
    if st.get("unaudited"):
        lines.append(f"WARNING: {st['unaudited']}")
    for alias in ALIASES:
        d = st.get(alias)
        if d is None:
            lines.append(f"{alias:<10}: none")
            continue
        s = d["scores"]
        lines.append(f"{alias:<10}: v{d['version']}  {str(d['content_hash'])[:16]}  base {d['base_model']}")
        lines.append(f"{'':<12}{d['primary_task']}: candidate {s['candidate']} vs base {s['base']} "
                     f"(diff {s['mean_diff']}, 95% CI [{s['ci_low']}, {s['ci_high']}])")
        lines.append(f"{'':<12}lineage: " + ", ".join(f"{k}={str(v)[:12]}" for k, v in d["lineage"].items()))
        if alias == CHALLENGER and d.get("verdict"):
            lines += [f"{'':<12}{row}" for row in decision.render(d["verdict"]).splitlines()]

    def v(x: str | None) -> str:
        return f"v{x}" if x else "none"

    for dead in st.get("reaped_runs", []):
        lines.append(f"pipeline run {dead['run_id']} marked FAILED: {dead['reason']}")
    if st.get("recent_moves"):
        lines.append("recent alias moves:")
    for m in st.get("recent_moves", []):
        lines.append(f"  {m['time']}  {m['alias']}: {v(m['from_version'])} -> {v(m['to_version'])}  ({m['action']})")
    return "\n".join(lines)
