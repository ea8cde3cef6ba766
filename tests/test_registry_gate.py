"""Registry stage, pure parts: the promotion gate, the champion history replay, store resolution.

The fabricated evaluation reports come from tests/support.py (tests/test_registry.py uses them too).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opsd_core.config import Params
from opsd_core.registry import ChampionEvidence, decide
from opsd_core.registry.audit import champion_stack, unaudited_champion
from opsd_core.registry.store import resolve_store
from tests.support import GUARD, PRIMARY, eval_report


def champ(cand: int, version: str = "1", settings: str = "s1", content: str = "old") -> ChampionEvidence:
    return ChampionEvidence(version, content, eval_report(cand, settings=settings))


CFG = Params().registry


# -- the gate (pure) ----------------------------------------------------------------------------
def test_gate_promotes_clear_win_without_champion() -> None:
    v = decide(eval_report(cand=30), CFG, None, "new")
    assert v["promote"] is True
    assert v["checks"]["vs_base"]["ci_low"] > 0
    assert v["checks"]["vs_champion"]["status"] == "no_champion"
    assert all(r.startswith("PASS") for r in v["reasons"])


@pytest.mark.parametrize(("cand", "margin", "why"), [
    (5, 0.0, "worse than base"),
    (10, 0.0, "equal to base"),
    (11, 0.0, "one doc better: bootstrap lower bound not above zero"),
    (14, 0.2, "significant but below the margin"),
])
def test_gate_rejects_candidates_not_clearly_better_than_base(cand: int, margin: float, why: str) -> None:
    cfg = CFG.model_copy(update={"margin": margin})
    v = decide(eval_report(cand=cand), cfg, None, "new")
    assert v["promote"] is False, why
    assert v["checks"]["vs_base"]["passed"] is False
    assert any(r.startswith("FAIL vs base") for r in v["reasons"])


def test_gate_margin_is_inclusive() -> None:
    cfg = CFG.model_copy(update={"margin": 0.25})  # 20/40 - 10/40 = 0.25 exactly
    assert decide(eval_report(cand=20), cfg, None, "new")["promote"] is True
    assert decide(eval_report(cand=19), cfg, None, "new")["promote"] is False


@pytest.mark.parametrize(("guard", "ok"), [((20, 19), True), ((20, 18), True), ((20, 17), False), ((20, 30), True)])
def test_gate_guard_tolerance(guard: tuple[int, int], ok: bool) -> None:
    # tolerance 0.05 = 2 of 40 docs
    v = decide(eval_report(cand=30, guard=guard), CFG, None, "new")
    assert v["promote"] is ok
    assert v["checks"]["guards"][GUARD]["passed"] is ok


def test_gate_fails_closed_on_missing_tasks() -> None:
    report = eval_report(cand=30)
    no_guard = {**report, "tasks": {PRIMARY: report["tasks"][PRIMARY]}}
    assert decide(no_guard, CFG, None, "new")["promote"] is False
    no_primary = {**report, "tasks": {GUARD: report["tasks"][GUARD]}}
    v = decide(no_primary, CFG, None, "new")
    assert v["promote"] is False and "missing" in v["checks"]["vs_base"]["reason"]


def test_gate_against_champion() -> None:
    report = eval_report(cand=30)
    assert decide(report, CFG, champ(20), "new")["promote"] is True
    worse = decide(report, CFG, champ(35), "new")
    assert worse["promote"] is False and worse["checks"]["vs_champion"]["mean_diff"] < 0
    tie = decide(report, CFG, champ(30), "new")
    assert tie["promote"] is False and tie["checks"]["vs_champion"]["status"] == "compared"
    other = decide(report, CFG, champ(20, settings="s2"), "new")
    assert other["promote"] is False and other["checks"]["vs_champion"]["status"] == "cannot_compare"
    lost = decide(report, CFG, ChampionEvidence("1", "old", None), "new")
    assert lost["promote"] is False and "no stored eval report" in lost["checks"]["vs_champion"]["reason"]
    same = decide(report, CFG, champ(35, content="new"), "new")
    assert same["promote"] is True and same["checks"]["vs_champion"]["status"] == "same"


def test_gate_pairs_champion_by_doc_id() -> None:
    report = eval_report(cand=30)
    ch = champ(20)
    # reorder the champion's samples: pairing must follow ids, not positions
    samples = ch.report["tasks"][PRIMARY]["candidate"]["samples"]
    ch.report["tasks"][PRIMARY]["candidate"]["samples"] = dict(reversed(list(samples.items())))
    v = decide(report, CFG, ch, "new")
    assert v["checks"]["vs_champion"]["mean_diff"] == pytest.approx(10 / 40)
    assert v["checks"]["vs_champion"]["ci_low"] > 0


def test_gate_recomputes_missing_diff() -> None:
    report = eval_report(cand=30)
    stripped = json.loads(json.dumps(report))
    del stripped["tasks"][PRIMARY]["diff"]
    a, b = decide(report, CFG, None, "new"), decide(stripped, CFG, None, "new")
    assert a["promote"] == b["promote"] is True
    assert a["checks"]["vs_base"]["mean_diff"] == pytest.approx(b["checks"]["vs_base"]["mean_diff"])


def test_champion_stack_replays_promotions_and_rollbacks() -> None:
    def mv(frm: str | None, to: str, action: str = "promote") -> dict:
        return {"alias": "champion", "from_version": frm, "to_version": to, "action": action}

    log = [mv(None, "1"), {"alias": "challenger", "from_version": None, "to_version": "9", "action": "register"},
           mv("1", "2"), mv("2", "3"), mv("3", "2", "rollback"), mv("2", "4")]
    assert champion_stack(log) == ["1", "2", "4"]
    assert champion_stack(log + [mv("4", "2", "rollback"), mv("2", "1", "rollback")]) == ["1"]



def test_a_champion_the_audit_log_does_not_end_at_is_named() -> None:
    log = [{"alias": "champion", "from_version": None, "to_version": "1", "action": "promote"},
           {"alias": "champion", "from_version": "1", "to_version": "2", "action": "promote"}]
    assert unaudited_champion(log, "2") is None and unaudited_champion([], None) is None
    assert "champion is v5 but opsd's audit log ends at v2" in str(unaudited_champion(log, "5"))
    assert "ends at no champion" in str(unaudited_champion([], "1"))
    assert "champion is unset" in str(unaudited_champion(log, None))  # the alias deleted by hand


def test_store_resolution_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default = resolve_store(Params(), tmp_path)
    assert default.tracking_uri == f"sqlite:///{tmp_path / '.opsd' / 'mlflow.db'}"
    assert default.artifact_location == (tmp_path / ".opsd" / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    env = resolve_store(Params(), tmp_path)
    assert env.tracking_uri == "http://127.0.0.1:5999" and env.artifact_location is None
    explicit = resolve_store(Params(registry={"tracking_uri": f"sqlite:///{tmp_path / 'x' / 'r.db'}"}), tmp_path)
    assert explicit.artifact_location == (tmp_path / "x" / "mlartifacts").as_uri()


def test_the_decision_reads_as_a_table() -> None:
    from opsd_core.registry import decision

    v = decide(eval_report(cand=30, guard=(20, 10)), CFG, champ(5), "new")
    rows = decision.rows(v)
    assert [r[0] for r in rows] == [f"vs base: {PRIMARY}", "vs champion", f"guard: {GUARD}"]
    base_row = rows[0]
    assert base_row[1:3] == ("0.2500", "0.7500") and base_row[3] == "+0.5000" and base_row[5] == "pass"
    assert base_row[4].startswith("[+") and rows[1][5] == "pass"
    assert rows[2][3] == "-0.2500" and rows[2][5] == "FAIL"  # the guard dropped by 0.25 > 0.05
    text = decision.render(v)
    assert text.splitlines()[0].split() == ["check", "base", "candidate", "difference", "95%", "CI", "result"]
    assert text.endswith("gate: not promoted")
    md = decision.render(v, markdown=True)
    assert md.splitlines()[1] == "|---|---|---|---|---|---|" and "**Gate: not promoted.**" in md
    assert decision.render(decide(eval_report(cand=30), CFG, None, "new")).endswith("gate: promote to champion")
    assert decision.from_tag(json.dumps(v)) == json.loads(json.dumps(v)) and decision.from_tag("{nope") is None


def test_live_metrics_that_mlflow_refuses_cost_a_warning_not_the_training(tmp_path: Path) -> None:
    from opsd_core.registry.live import LiveMetrics
    from opsd_core.registry.store import open_client

    said: list[str] = []
    params = Params()
    live = LiveMetrics(params, tmp_path, "no-such-run", said.append)
    live({"step": 1, "loss": 0.5})
    live({"step": 2, "loss": 0.4})  # no second attempt, no second warning
    assert live.failed and len(said) == 1 and "register logs the whole curve" in said[0]

    client = open_client(resolve_store(params, tmp_path))
    run = client.create_run(client.create_experiment("live")).info.run_id
    live = LiveMetrics(params, tmp_path, run, said.append)
    for step in (1, 2, 3):
        live({"step": step, "loss": 1.0 / step, "kl": 0.1})
    assert [m.step for m in client.get_metric_history(run, "train/loss")] == [1, 2, 3] and not live.failed
