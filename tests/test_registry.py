"""Registry stage on a real MLflow store: register, gate with champion, rollback, audit, races, server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from opsd_core.config import Params
from opsd_core.registry import RegistryError
from opsd_core.registry.audit import champion_stack, read_audit
from opsd_core.registry.store import download_version, ensure_experiment, open_client, resolve_store
from opsd_core.stages.promote import rollback
from opsd_core.stages.register import register
from opsd_core.stages.status import render_status, status
from tests.servers import free_port, serve_mlflow
from tests.support import GUARD, PRIMARY, eval_report, probe_logits, registry_project, tiny_llama

pytestmark = pytest.mark.slow  # MLflow servers and registering processes: out of the fast lane (make test-fast)

REPO = Path(__file__).resolve().parents[1]


# -- a tiny real peft adapter and a project folder -------------------------------------------------
@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, empty MLflow SQLite file: migrating a new store costs seconds on a busy machine.

    The racing test still starts from no store at all.
    """
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def _no_outer_tracking(monkeypatch: pytest.MonkeyPatch) -> None:
    # tests pick their own store; a pipeline run id from an enclosing flow must not leak in
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("OPSD_MLFLOW_RUN_ID", raising=False)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_store: Path) -> tuple[Path, Params]:
    monkeypatch.setenv("OPSD_FLOW_RUN_ID", "flow-123")
    (tmp_path / ".opsd").mkdir()
    shutil.copyfile(empty_store, tmp_path / ".opsd" / "mlflow.db")
    return tmp_path, Params(eval={"bootstrap_samples": 500})


def load_version(client: Any, name: str, version: str, base_dir: Path, dst: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    local = download_version(client, name, version, dst)
    return probe_logits(PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), str(local)))


# -- register / promote / rollback on SQLite ----------------------------------------------------
def test_register_promotes_logs_and_is_loadable(project: tuple[Path, Params], base_dir: Path) -> None:
    root, params = project
    expected = registry_project(root, base_dir, seed=1, report=eval_report(cand=30))
    res = register(params, root)
    assert res["version"] == "1" and res["champion"] == "1" and res["challenger"] == "1"
    assert res["verdict"]["promote"] is True and not res["already_registered"]
    assert json.loads((root / "reports" / "registry.json").read_text())["version"] == "1"
    gate = json.loads((root / "reports" / "metrics" / "gate.json").read_text())  # `dvc metrics show`'s gate row
    vs_base = res["verdict"]["checks"]["vs_base"]
    assert gate == {"promoted": 1, "gain": vs_base["mean_diff"], "gain_ci_low": vs_base["ci_low"],
                    "gain_ci_high": vs_base["ci_high"]} and gate["gain_ci_low"] > 0

    store = resolve_store(params, root)
    assert store.tracking_uri == f"sqlite:///{root / '.opsd' / 'mlflow.db'}"
    client = open_client(store)
    run = client.get_run(res["run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith((root / ".opsd" / "mlartifacts").as_uri())
    assert run.data.params["registry.primary_task"] == PRIMARY
    assert not any(k.startswith("params.") for k in run.data.params)
    assert run.data.metrics["candidate_score"] == pytest.approx(0.75)  # a column in the runs list
    assert run.data.tags["mlflow.source.name"] == "opsd register" and run.data.tags.get("mlflow.user")
    note = run.data.tags["mlflow.note.content"]  # the run's description: the gate's table
    assert note.startswith("| check | base | candidate | difference | 95% CI | result |")
    assert f"| vs base: {PRIMARY} |" in note and note.endswith("**Gate: promote to champion.**")
    assert run.data.tags["lineage.flow_run_id"] == "flow-123"
    assert run.data.tags["lineage.dvc_raw_md5"] == "abc123.dir"
    (dataset,) = [d.dataset for d in run.inputs.dataset_inputs]  # the training data, by its hashes
    assert (dataset.name, dataset.digest, dataset.source_type) == ("opsd-train", "d" * 16, "dvc")
    assert json.loads(dataset.source)["dvc_raw_md5"] == "abc123.dir"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]
    assert run.data.metrics[f"vs_base/{PRIMARY}/candidate"] == pytest.approx(0.75)
    # the self-teacher gap the training started from (train.json's diagnosis)
    assert run.data.metrics["train_gap/accuracy_gap"] == pytest.approx(0.55)
    # the run page's chart groups, sorted by name as MLflow's UI sorts them: the training curves come first
    groups = sorted({k.rsplit("/", 1)[0] for k in run.data.metrics if "/" in k})
    assert groups[:3] == ["train", "train_gap", "train_summary"] and groups[-1].startswith("vs_base/")
    assert run.data.tags["opsd.diagnosis"] == "room for OPSD"
    files = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert files == {"plots/training_curve.png", "plots/eval.png"}
    card = Path(client.download_artifacts(run.info.run_id, "model_card.md", str(root / "dl"))).read_text()
    assert "`tiny`" in card and "abc123.dir" in card and "promoted" in card

    mv = client.get_model_version(params.registry.model_name, "1")
    assert "| check | base | candidate |" in mv.description and "**Gate: promote to champion.**" in mv.description
    lease = client.get_registered_model(f"{params.registry.model_name}-promotion-lease")  # labelled internal
    assert lease.tags["opsd.internal"] == "promotion lease" and lease.description.startswith("INTERNAL to opsd")
    assert mv.tags["gate.promote"] == "true" and mv.tags["lineage.params_hash"] == params.hash()
    assert mv.tags["score.opsd_val.candidate"] == "0.75"
    got = load_version(client, params.registry.model_name, "1", base_dir, root / "v1")
    assert torch.allclose(got, expected, atol=1e-5)
    from transformers import LlamaForCausalLM

    assert not torch.allclose(probe_logits(LlamaForCausalLM.from_pretrained(base_dir)), expected, atol=1e-3)

    # same weights again: no new run, no new version
    again = register(params, root)
    assert again["already_registered"] and again["version"] == "1"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert len(client.search_model_versions(f"name='{params.registry.model_name}'")) == 1


def test_gate_champion_rollback_audit_and_status(
    project: tuple[Path, Params], base_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    root, params = project
    name = params.registry.model_name
    client = open_client(resolve_store(params, root))
    # v1 is registered inside a pipeline run opened by the flow, which also closes it
    flow_run = client.create_run(ensure_experiment(client, resolve_store(params, root), "opsd")).info.run_id
    monkeypatch.setenv("OPSD_MLFLOW_RUN_ID", flow_run)
    for seed, cand in ((1, 20), (2, 30), (3, 25)):  # v1 champion, v2 beats it, v3 worse than v2
        registry_project(root, base_dir, seed, eval_report(cand=cand))
        res = register(params, root)
        monkeypatch.delenv("OPSD_MLFLOW_RUN_ID", raising=False)
        if seed == 1:
            assert res["run_id"] == flow_run and client.get_run(flow_run).info.status == "RUNNING"
    assert res["version"] == "3" and res["challenger"] == "3" and res["champion"] == "2"
    assert res["verdict"]["promote"] is False and res["promoted"] is False
    v3 = client.get_model_version(name, "3")
    assert v3.tags["gate.promote"] == "false" and "FAIL vs champion v2" in v3.tags["gate.reasons"]
    verdict_file = json.loads((root / "reports" / "registry.json").read_text())["verdict"]
    assert verdict_file["checks"]["vs_champion"]["champion_version"] == "2"

    text = render_status(status(params, root))
    assert "champion  : v2" in text and "challenger: v3" in text
    # the challenger's gate decision, as a table: the champion comparison failed
    assert any(line.split()[:2] == ["vs", "champion"] and line.split()[-1] == "FAIL" for line in text.splitlines())
    assert "gate: not promoted" in text and "WARNING" not in text

    # champion set by hand (the MLflow UI), past the gate: status and the next registration say so
    client.set_registered_model_alias(name, "champion", "3")
    assert "WARNING: champion is v3 but opsd's audit log ends at v2" in render_status(status(params, root))
    repaired = rollback(params, root)  # the first rollback repairs: back to the audited champion
    assert repaired["champion"] == "2" and repaired["previous"] == "3" and repaired["repaired"]
    assert "WARNING" not in render_status(status(params, root))

    back = rollback(params, root)
    assert back["champion"] == "1" and str(client.get_model_version_by_alias(name, "champion").version) == "1"
    with pytest.raises(RegistryError, match="first champion"):
        rollback(params, root)

    log = read_audit(root / ".opsd", name)
    moves = [(e["alias"], e["from_version"], e["to_version"], e["action"]) for e in log]
    assert moves == [
        ("challenger", None, "1", "register"), ("champion", None, "1", "promote"),
        ("challenger", "1", "2", "register"), ("champion", "1", "2", "promote"),
        ("challenger", "2", "3", "register"), ("champion", "3", "2", "repair"), ("champion", "2", "1", "rollback"),
    ]
    assert all(e["actor"] and e["time"] for e in log)
    history = json.loads(client.get_model_version(name, "2").tags["alias_history"])
    assert [(h["alias"], h["action"]) for h in history] == [
        ("challenger", "register"), ("champion", "promote"), ("challenger", "register"), ("champion", "repair"),
        ("champion", "rollback")]


def test_malformed_or_stale_report_is_refused_before_any_run(project: tuple[Path, Params], base_dir: Path) -> None:
    root, params = project
    report = eval_report(cand=30)
    del report["tasks"][GUARD]["candidate"]["score"]
    registry_project(root, base_dir, 1, report)
    with pytest.raises(RegistryError, match="opsd_gsm8k100.candidate.score"):
        register(params, root)
    stale = eval_report(cand=30)
    stale["models"] = {"candidate": {"content_hash": "weights-evaluated-earlier"}}
    (root / "reports" / "eval.json").write_text(json.dumps(stale))
    with pytest.raises(RegistryError, match="re-run evaluate"):
        register(params, root)
    st = status(params, root)
    assert st["champion"] is None and st["challenger"] is None
    client = open_client(resolve_store(params, root))
    assert client.get_experiment_by_name(params.registry.experiment) is None


def test_failure_mid_registration_leaves_registry_as_it_was(
    project: tuple[Path, Params], base_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from opsd_core.stages import register as reg_module

    root, params = project
    name = params.registry.model_name
    registry_project(root, base_dir, 1, eval_report(cand=20))
    register(params, root)
    real_move = reg_module.move_alias

    def failing_move(*args: Any, **kwargs: Any) -> Any:
        entry = real_move(*args, **kwargs)
        if entry and entry["action"] == "promote":  # the alias moved, then the process "fails"
            raise OSError("disk full")
        return entry

    monkeypatch.setattr(reg_module, "move_alias", failing_move)
    registry_project(root, base_dir, 2, eval_report(cand=35))
    with pytest.raises(OSError, match="disk full"):
        register(params, root)
    client = open_client(resolve_store(params, root))
    runs = client.search_runs([client.get_experiment_by_name(params.registry.experiment).experiment_id],
                              order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in runs] == ["FINISHED", "FAILED"]
    assert [str(v.version) for v in client.search_model_versions(f"name='{name}'")] == ["1"]
    for alias in ("champion", "challenger"):
        assert str(client.get_model_version_by_alias(name, alias).version) == "1"
    log = read_audit(root / ".opsd", name)
    assert [(e["alias"], e["action"]) for e in log[-2:]] == [("challenger", "revert"), ("champion", "revert")]
    assert champion_stack(log) == ["1"]


_WORKER = """
import json, sys
from pathlib import Path
from opsd_core.config import Params
from opsd_core.stages.register import register
import mlflow  # pay the import before the start signal so both processes really race
params = Params.model_validate(json.loads(sys.argv[2]))
print("ready", flush=True)
sys.stdin.readline()
print(json.dumps(register(params, Path(sys.argv[1]))), flush=True)
"""


def test_two_racing_registrations_leave_one_consistent_champion(
    tmp_path: Path, base_dir: Path,
) -> None:
    shared = tmp_path / "state"  # two checkouts, one registry
    params = Params(registry={"state_dir": str(shared)}, eval={"bootstrap_samples": 500})
    roots = [tmp_path / "a", tmp_path / "b"]
    registry_project(roots[0], base_dir, 1, eval_report(cand=20))
    registry_project(roots[1], base_dir, 2, eval_report(cand=35))  # b beats a whichever goes first
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(r), params.model_dump_json()], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for r in roots]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    client = open_client(resolve_store(params, roots[0]))
    name = params.registry.model_name
    assert sorted(o["version"] for o in outs) == ["1", "2"]
    champion = str(client.get_model_version_by_alias(name, "champion").version)
    assert champion == outs[1]["version"]
    champ_moves = [e for e in read_audit(shared, name) if e["alias"] == "champion"]
    assert champ_moves[0]["from_version"] is None
    for prev, nxt in zip(champ_moves, champ_moves[1:], strict=False):
        assert nxt["from_version"] == prev["to_version"]  # each move saw the previous one
    assert champ_moves[-1]["to_version"] == champion


# -- a real tracking server, as a user would run it ---------------------------------------------
@pytest.fixture
def mlflow_server(tmp_path: Path) -> Any:
    with serve_mlflow(tmp_path, free_port()) as url:
        yield url


@pytest.mark.slow
def test_tracking_server_as_registry(
    mlflow_server: str, tmp_path: Path, base_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mlflow.artifacts
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # the user's way of pointing at a server
    params = Params(eval={"bootstrap_samples": 200})
    root = tmp_path / "proj"
    expected = registry_project(root, base_dir, 1, eval_report(cand=30))
    res = register(params, root)
    assert res["champion"] == "1" and res["tracking_uri"] == mlflow_server
    assert not (root / ".opsd" / "mlflow.db").exists()
    local = mlflow.artifacts.download_artifacts(
        f"models:/{params.registry.model_name}@champion", dst_path=str(tmp_path / "dl"),
        tracking_uri=mlflow_server, registry_uri=mlflow_server)
    assert (Path(local) / "MLmodel").is_file()  # an MLflow model; the adapter as trained is its artifact
    got = probe_logits(PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir),
                                                 str(Path(local) / "artifacts" / "candidate")))
    assert torch.allclose(got, expected, atol=1e-5)
    assert list((tmp_path / "server-artifacts").rglob("adapter_model.safetensors"))
    assert register(params, root)["already_registered"]


def test_reading_an_empty_registry_creates_nothing(tmp_path: Path) -> None:
    """`opsd status` and `opsd promote --rollback` before any registration: clear answers, no database made."""
    params = Params(registry={"tracking_uri": f"sqlite:///{tmp_path / 'state' / 'mlflow.db'}"})
    text = render_status(status(params, tmp_path))
    assert "champion  : none" in text and "challenger: none" in text
    with pytest.raises(RegistryError, match="nothing to roll back"):
        rollback(params, tmp_path)
    assert not (tmp_path / "state" / "mlflow.db").exists()


def test_mlflow_params_hold_only_the_settings_that_apply(project: tuple[Path, Params]) -> None:
    from opsd_core.stages.register import applicable_params

    _, params = project
    tiny = params.model_copy(deep=True)
    tiny.model.base = "tiny"
    assert "tiny" in applicable_params(tiny)["model"]
    other = params.model_copy(deep=True)
    other.model.base = "bundled:smollm2-135m-instruct"
    dump = applicable_params(other)
    assert "tiny" not in dump["model"] and dump["model"]["base"] == other.model.base
    assert set(dump) >= {"model", "lora", "opsd", "train", "eval", "registry"}


@pytest.mark.slow
def test_an_unreachable_tracking_server_registers_nothing_and_the_next_run_registers_once(
    tmp_path: Path, base_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries would take minutes
    params = Params(eval={"bootstrap_samples": 200})
    root = tmp_path / "proj"
    registry_project(root, base_dir, 1, eval_report(cand=30))
    with pytest.raises(RegistryError, match=rf"^the MLflow server at {url} cannot be reached .*nothing was "
                                            r"registered or promoted: rerun `opsd register`"):
        register(params, root)
    assert not (root / "reports" / "registry.json").exists()
    with serve_mlflow(tmp_path, port):  # the server is back, on the same address
        first = register(params, root)
        again = register(params, root)
        from mlflow import MlflowClient

        versions = MlflowClient(url).search_model_versions(f"name='{params.registry.model_name}'")
    assert first["version"] == "1" and not first["already_registered"]
    assert again["already_registered"] and again["version"] == "1"
    assert len(versions) == 1
