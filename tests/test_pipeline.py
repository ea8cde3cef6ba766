"""The pipeline end to end on the smoke profile, with real DVC, MLflow (SQLite) and Prefect.

One temporary git repository per module: the retrain flow runs `dvc repro` of every stage, registers
a version, reruns as a no-op, ingests new traces into a new data version and a new candidate, and a
failure injected in evaluate registers nothing and leaves the champion alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = str(Path(sys.executable).parent)


def sh(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": os.pathsep.join([BIN, os.environ.get("PATH", "")])}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def set_param(project: Path, dotted: str, value: object) -> None:
    tree = yaml.safe_load((project / "params.yaml").read_text())
    node = tree
    *parents, last = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    (project / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pipeline") / "repo"
    path.mkdir()
    for name in ("params.yaml", "dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, path / name)
    shutil.copytree(ROOT / ".dvc", path / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
    set_param(path, "profile", "smoke")
    set_param(path, "model.cache_dir", str(tmp_path_factory.mktemp("models")))
    sh(["git", "init", "-q"], path)
    from flows.bootstrap import bootstrap
    from opsd_core.config import load_params

    bootstrap(load_params(path / "params.yaml"), path)  # what `opsd run` does first: data + `dvc add`
    assert (path / "data/raw.dvc").is_file()
    sh(["git", "add", "-A"], path)
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "init"], path)
    return path


def registry_state(project: Path) -> dict:
    from opsd_core.config import load_params
    from opsd_core.registry.store import all_versions, open_client, resolve_store, version_by_alias

    params = load_params(project / "params.yaml")
    client = open_client(resolve_store(params, project))
    name = params.registry.model_name
    try:
        versions = all_versions(client, name)
    except Exception:
        versions = []
    champion = version_by_alias(client, name, "champion") if versions else None
    challenger = version_by_alias(client, name, "challenger") if versions else None
    return {
        "versions": versions,
        "champion": champion.version if champion else None,
        "challenger": challenger.version if challenger else None,
        "client": client,
        "params": params,
    }


def run_flow(project: Path) -> dict:
    from flows.retrain import retrain

    return retrain(str(project / "params.yaml"))


def test_run_registers_a_challenger_with_lineage(project: Path, prefect_harness: None) -> None:
    summary = run_flow(project)
    assert summary["ran"] == ["prepare", "train", "evaluate_base", "evaluate", "register"]
    state = registry_state(project)
    assert len(state["versions"]) == 1
    version = state["versions"][0]
    assert state["challenger"] == version.version
    tags = version.tags
    assert tags.get("content_hash") == json.loads(
        (project / "models/candidate/opsd_candidate.json").read_text())["content_hash"]
    run = state["client"].get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags.get("lineage.dvc_raw_md5") or run.data.tags.get("dvc_raw_md5")
    assert run.data.tags.get("lineage.flow_run_id")
    trained = json.loads((project / "reports/train.json").read_text())
    for key in ("device", "sampling_dtype", "packs", "allocator"):  # the execution record reaches MLflow
        assert run.data.params[f"execution.{key}"] == str(trained["execution"][key])
    assert run.data.params["machine.torch_cpu"] == trained["machine"]["torch_cpu"]
    artifacts = {a.path for a in state["client"].list_artifacts(version.run_id)}
    assert any(p.endswith(".md") for p in artifacts), artifacts
    assert (project / "reports/registry.json").is_file()


def test_rerun_with_nothing_changed_is_a_no_op(project: Path, prefect_harness: None) -> None:
    before = registry_state(project)
    summary = run_flow(project)
    assert summary["ran"] == []
    assert len(registry_state(project)["versions"]) == len(before["versions"])
    assert sh([sys.executable, "-m", "dvc", "status", "--json"], project).stdout.strip() in ("{}", "")


def test_dvc_repro_reruns_from_train_when_a_training_param_changes(project: Path) -> None:
    set_param(project, "profiles.smoke.train.lr", 0.004)
    out = sh([sys.executable, "-m", "dvc", "repro", "--dry"], project).stdout
    assert "Running stage 'train'" in out
    assert "Running stage 'prepare'" not in out
    assert "Running stage 'evaluate_base'" not in out
    set_param(project, "profiles.smoke.train.lr", 0.005)  # back to the reproduced state
    assert "Running stage" not in sh([sys.executable, "-m", "dvc", "repro", "--dry"], project).stdout


def test_reproduced_candidate_has_the_same_weights(project: Path) -> None:
    meta = json.loads((project / "models/candidate/opsd_candidate.json").read_text())
    shutil.rmtree(project / ".opsd" / "checkpoints", ignore_errors=True)
    sh([sys.executable, "-m", "dvc", "repro", "--force", "--single-item", "train"], project)
    again = json.loads((project / "models/candidate/opsd_candidate.json").read_text())
    assert again["content_hash"] == meta["content_hash"]


def test_ingest_creates_a_new_data_version_and_candidate(project: Path, prefect_harness: None) -> None:
    raw_md5 = (project / "data/raw.dvc").read_text()
    before = registry_state(project)
    incoming = project / "incoming"
    incoming.mkdir(exist_ok=True)
    rows = [{"problem": f"Ann has {i} pens and gets {i + 2} more. How many pens does Ann have now?",
             "solution": f"{i} + {i + 2} = {2 * i + 2}\n#### {2 * i + 2}", "answer": str(2 * i + 2)}
            for i in range(3, 23)]
    (incoming / "batch1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (incoming / "junk.jsonl").write_text("not json\n")
    summary = run_flow(project)
    assert [a["file"] for a in summary["ingest"]["added"]] == ["batch1.jsonl"]
    assert [r["file"] for r in summary["ingest"]["rejected_files"]] == ["junk.jsonl"]
    assert (incoming / "rejected" / "junk.reason.txt").is_file()
    assert (project / "data/raw.dvc").read_text() != raw_md5
    assert "prepare" in summary["ran"] and "register" in summary["ran"]
    after = registry_state(project)
    assert len(after["versions"]) == len(before["versions"]) + 1
    assert after["challenger"] != before["challenger"]


def test_failed_evaluate_registers_nothing_and_keeps_the_champion(project: Path, prefect_harness: None) -> None:
    before = registry_state(project)
    # a real failure: a standard lm-eval task whose dataset is not available offline
    set_param(project, "profiles.smoke.eval.extra_tasks", ["gsm8k"])
    set_param(project, "profiles.smoke.train.steps", 3)  # a new candidate that would be registered
    try:
        with pytest.raises(Exception, match="gsm8k"):
            run_flow(project)
    finally:
        set_param(project, "profiles.smoke.eval.extra_tasks", [])
    after = registry_state(project)
    assert len(after["versions"]) == len(before["versions"])
    assert after["champion"] == before["champion"]
    runs = after["client"].search_runs(
        [after["client"].get_experiment_by_name(after["params"].registry.experiment).experiment_id],
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    assert runs[0].info.status == "FAILED"
