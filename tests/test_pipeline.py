"""The pipeline end to end on the smoke profile, with real DVC, MLflow (SQLite) and Prefect.

One temporary git repository per test session (conftest.py: smoke_project, shared with tests/test_schedule.py),
on which the first pipeline run (`first_run`) reproduces every stage and registers a version; each test needs
only that fixture (any one passes alone). The tests that would leave the project unreproduced work on a copy
of it: a forced retrain, a failure in evaluate, a SIGTERM, a killed training that Prefect retries. Ingesting
new traces changes the project itself but leaves it reproduced.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.dvc import StageError
from tests.faults import kill_once_after_checkpoint
from tests.projects import content_hash, copy_project, registry_state

pytestmark = pytest.mark.slow  # the retrain flow, Prefect and dvc repro: out of the fast lane (make test-fast)

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
def project(smoke_project: Path) -> Path:
    """The session's committed smoke project (conftest.py), shared with other test files."""
    return smoke_project


def run_flow(project: Path) -> dict:
    from flows.retrain import retrain

    return retrain(str(project / "params.yaml"))


def latest_pipeline_run(state: dict) -> Any:
    client, params = state["client"], state["params"]
    experiment = client.get_experiment_by_name(params.registry.experiment).experiment_id
    return client.search_runs([experiment], order_by=["attributes.start_time DESC"], max_results=1)[0]


@pytest.fixture(scope="module")
def first_run(smoke_first_run: dict[str, Any]) -> dict[str, Any]:
    """The retrain flow on the fresh project (conftest.py: smoke_first_run), with what the tests check it
    against, taken at the time."""
    return smoke_first_run


def test_run_registers_a_challenger_with_lineage(project: Path, first_run: dict[str, Any]) -> None:
    assert first_run["summary"]["ran"] == ["prepare", "train", "evaluate_base", "evaluate", "register"]
    assert first_run["versions"] == ["1"] and first_run["challenger"] == "1"
    state = registry_state(project)
    version = state["client"].get_model_version(state["params"].registry.model_name, "1")
    tags = version.tags
    assert tags["content_hash"] == first_run["content_hash"]
    run = state["client"].get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["opsd.content_hash"] == first_run["content_hash"]
    # the lineage the register stage writes (registry/lineage.py: collect), on the run and on the version
    lineage = {k: v for k, v in run.data.tags.items() if k.startswith("lineage.")}
    assert lineage == {k: v for k, v in tags.items() if k.startswith("lineage.")}
    dvc_lock_sha256 = lineage.pop("lineage.dvc_lock_sha256")  # dvc.lock as it was while register ran
    assert re.fullmatch(r"[0-9a-f]{64}", dvc_lock_sha256)
    assert lineage == {
        "lineage.git_commit": first_run["git_commit"],
        "lineage.git_dirty": "false",  # the stages write ignored or untracked files only
        "lineage.dvc_raw_md5": first_run["raw_md5"],
        "lineage.params_hash": first_run["params_hash"],
        "lineage.data_hash": first_run["data_hash"],
        "lineage.flow_run_id": first_run["flow_run_id"],
        "lineage.profile": "smoke",
    }
    trained = json.loads((project / "reports/train.json").read_text())
    if trained["content_hash"] == first_run["content_hash"]:  # not retrained since (the ingest test retrains)
        for key in ("device", "sampling_dtype", "packs", "allocator"):  # the execution record reaches MLflow
            assert run.data.params[f"execution.{key}"] == str(trained["execution"][key])
        assert run.data.params["machine.torch_cpu"] == trained["machine"]["torch_cpu"]
    artifacts = {a.path for a in state["client"].list_artifacts(version.run_id)}
    assert "model_card.md" in artifacts and "gate" in artifacts, artifacts
    # the training logged its curve into the pipeline's run step by step (registry/live.py), once per step,
    # as it ran (not all at one time after training); register did not log it again
    (dataset,) = [d.dataset for d in run.inputs.dataset_inputs]  # the training split, by its hashes
    assert json.loads(dataset.source)["data_hash"] == first_run["data_hash"]
    assert dataset.digest == first_run["data_hash"][:36] and json.loads(dataset.source)["dvc_raw_md5"] == first_run["raw_md5"]
    history = state["client"].get_metric_history(version.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert len({m.timestamp for m in history}) == 4



def test_mlflows_own_loader_serves_a_registered_version(project: Path, first_run: dict[str, Any],
                                                        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The version as an MLflow model (pyfunc): `models:/<name>/<version>` (or `@champion`) loads with MLflow's
    loader and answers as generate() on the trained candidate does."""
    import mlflow.pyfunc
    import pandas as pd
    import torch

    from opsd_core.algorithm.prompts import student_prompt_ids
    from opsd_core.models.sources import load_candidate
    from opsd_core.registry.store import download_version

    state = registry_state(project)
    client, name = state["client"], state["params"].registry.model_name
    monkeypatch.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)
    served = mlflow.pyfunc.load_model(f"models:/{name}/1")
    assert served.metadata.get_input_schema().input_names() == ["problem"]
    answer = served.predict(pd.DataFrame({"problem": ["What is 12 + 30?"]}))
    candidate = download_version(client, name, "1", tmp_path / "v1")  # the adapter as trained
    meta = json.loads((candidate / "opsd_candidate.json").read_text())
    model, tok = load_candidate(meta["base_path"], candidate)
    ids = torch.tensor([student_prompt_ids(tok, "What is 12 + 30?")])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    direct = model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=state["params"].eval.max_new_tokens, pad_token_id=pad)
    assert list(answer) == [tok.decode(direct[0, ids.shape[1]:], skip_special_tokens=True)]


def test_rerun_with_nothing_changed_is_a_no_op(project: Path, first_run: dict[str, Any]) -> None:
    before = registry_state(project)
    summary = run_flow(project)
    assert summary["ran"] == []
    assert len(registry_state(project)["versions"]) == len(before["versions"])
    assert sh([sys.executable, "-m", "dvc", "status", "--json"], project).stdout.strip() in ("{}", "")


def test_dvc_repro_reruns_from_train_when_a_training_param_changes(project: Path, first_run: dict[str, Any]) -> None:
    text = (project / "params.yaml").read_text()
    try:
        set_param(project, "profiles.smoke.train.lr", 0.004)
        out = sh([sys.executable, "-m", "dvc", "repro", "--dry"], project).stdout
        assert "Running stage 'train'" in out
        assert "Running stage 'prepare'" not in out
        assert "Running stage 'evaluate_base'" not in out
    finally:
        (project / "params.yaml").write_text(text)  # back to the reproduced state
    assert "Running stage" not in sh([sys.executable, "-m", "dvc", "repro", "--dry"], project).stdout


def test_reproduced_candidate_has_the_same_weights(project: Path, first_run: dict[str, Any], tmp_path: Path) -> None:
    copy = copy_project(project, tmp_path / "repo")
    before = content_hash(copy)
    shutil.rmtree(copy / ".opsd" / "checkpoints", ignore_errors=True)
    out = sh([sys.executable, "-m", "dvc", "repro", "--force", "--single-item", "train"], copy).stdout
    assert "Running stage 'train'" in out
    assert content_hash(copy) == before


def test_ingest_creates_a_new_data_version_and_candidate(project: Path, first_run: dict[str, Any]) -> None:
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
    assert summary["ran"] == ["prepare", "train", "evaluate_base", "evaluate", "register"]  # val split changed too
    after = registry_state(project)
    assert len(after["versions"]) == len(before["versions"]) + 1
    newest = str(max(int(v.version) for v in after["versions"]))
    assert str(after["challenger"]) == newest != str(before["challenger"])
    assert sh([sys.executable, "-m", "dvc", "status", "--json"], project).stdout.strip() in ("{}", "")


def test_failed_evaluate_registers_nothing_and_keeps_the_champion(project: Path, first_run: dict[str, Any],
                                                                  tmp_path: Path) -> None:
    copy = copy_project(project, tmp_path / "repo")
    before = registry_state(copy)
    # a real failure: a standard lm-eval task whose dataset is not available offline
    set_param(copy, "profiles.smoke.eval.extra_tasks", ["gsm8k"])
    set_param(copy, "profiles.smoke.train.steps", 3)  # a new candidate that would be registered
    with pytest.raises(StageError, match=r"(?s)^`dvc repro --single-item evaluate_base` failed \(exit \d+\):.*"
                                         r"EvalDataError: task 'gsm8k': its dataset is not available"):
        run_flow(copy)
    after = registry_state(copy)
    assert [v.version for v in after["versions"]] == [v.version for v in before["versions"]]
    assert after["champion"] == before["champion"] and after["challenger"] == before["challenger"]
    run = latest_pipeline_run(after)
    assert run.info.status == "FAILED"
    assert run.data.tags["opsd.failure"].startswith("StageError: `dvc repro --single-item evaluate_base` failed")
    assert content_hash(copy) != first_run["content_hash"]  # train did run: a new candidate, left unregistered


def test_sigterm_marks_the_pipeline_run_failed_and_registers_nothing(project: Path, first_run: dict[str, Any],
                                                                     tmp_path: Path, prefect_harness: None) -> None:
    """A SIGTERM (a scheduler stopping the flow) while a stage runs: the flow's process exits 143, its MLflow
    pipeline run is FAILED, and nothing is registered. The flow runs in its own process, on this session's
    Prefect server; the signal goes once training has written its first checkpoint."""
    from prefect.settings import PREFECT_API_URL

    from opsd_core.registry import leases
    from opsd_core.registry.store import resolve_store

    copy = copy_project(project, tmp_path / "repo")
    shutil.rmtree(copy / ".opsd" / "checkpoints", ignore_errors=True)
    set_param(copy, "profiles.smoke.train.steps", 200)  # far longer than the test waits
    set_param(copy, "profiles.smoke.train.checkpoint_every", 1)
    before = registry_state(copy)
    earlier_run = latest_pipeline_run(before).info.run_id
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(),
           "PATH": os.pathsep.join([BIN, os.environ.get("PATH", "")])}
    code = "import sys; from flows.retrain import retrain; retrain(sys.argv[1])"
    log = tmp_path / "flow.log"  # a file, not a pipe: a full pipe would stall the flow
    with log.open("w") as out:
        flow = subprocess.Popen([sys.executable, "-c", code, str(copy / "params.yaml")], cwd=copy, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not glob.glob(str(copy / ".opsd/checkpoints/*/step-*")):  # the train stage is running
            assert flow.poll() is None, f"the flow ended before training started:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "training did not write a checkpoint within 300 s"
            time.sleep(0.2)
        flow.send_signal(signal.SIGTERM)
        flow.wait(timeout=300)
    finally:
        try:  # whatever the flow left running in its process group (dvc, the training)
            os.killpg(flow.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert flow.returncode == 143, log.read_text()[-3000:]
    after = registry_state(copy)
    assert [v.version for v in after["versions"]] == [v.version for v in before["versions"]]
    assert after["challenger"] == before["challenger"] and after["champion"] == before["champion"]
    run = latest_pipeline_run(after)
    assert run.info.run_id != earlier_run and run.data.tags["opsd.pipeline"] == "retrain"  # this flow's run
    assert run.info.status == "FAILED"
    assert not list(leases.lease_dir(resolve_store(after["params"], copy).state_dir).glob("*.lease"))  # closed
    reason = run.data.tags.get("opsd.failure")
    assert reason == "SIGTERM"


def test_a_killed_training_is_retried_by_prefect_and_resumes(project: Path, first_run: dict[str, Any],
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The train task has `retries=flow.train_retries`: its training process dies (SIGKILL) right after the
    step-2 checkpoint, Prefect runs the task again, and `opsd train` resumes from that checkpoint to the very
    weights of an uninterrupted run (first_run's candidate)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.retrain import retrain

    copy = copy_project(project, tmp_path / "repo")
    shutil.rmtree(copy / ".opsd" / "checkpoints", ignore_errors=True)
    # a training setting that changes no weight, so DVC reruns train rather than restoring it from its run cache
    set_param(copy, "profiles.smoke.train.progress", False)
    marker = tmp_path / "killed-once"
    for key, value in kill_once_after_checkpoint(2, marker).items():
        monkeypatch.setenv(key, value)
    before = registry_state(copy)
    expected = content_hash(copy)  # trained without interruption

    flow_state = retrain(str(copy / "params.yaml"), return_state=True)
    summary = flow_state.result()
    assert marker.is_file()  # the first attempt was killed after its step-2 checkpoint
    assert "train" in summary["ran"] and "register" in summary["ran"]
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id])))
    (train_run,) = [r for r in runs if r.name.startswith("train-")]
    assert train_run.run_count == 2 and train_run.state.is_completed()  # failed once, then retried
    assert content_hash(copy) == expected  # resumed to the weights of the uninterrupted run
    assert summary["train"]["steps"] == 4
    after = registry_state(copy)
    assert [v.version for v in after["versions"]] == [v.version for v in before["versions"]]  # the same weights
    assert summary["registry"]["already_registered"] is True


@pytest.mark.usefixtures("prefect_harness")
def test_the_flow_run_is_named_and_its_stages_linked(project: Path, first_run: dict[str, Any]) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(first_run["flow_run_id"])
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    labels = ("smoke", f"params{first_run['params_hash'][:8]}", f"data{first_run['raw_md5'].removesuffix('.dir')[:8]}")
    assert run.name == "retrain-" + "-".join(labels), run.name
    by_id = {str(t.id): t.name for t in task_runs}
    # what each task run waited for, by name: the graph's edges
    edges = {t.name.rsplit("-", 1)[0]: sorted(by_id[str(d.id)].rsplit("-", 1)[0] for d in t.task_inputs.get("wait_for", []))
             for t in task_runs}
    assert edges == {"ingest": [], "prepare": ["ingest"], "train": ["prepare"], "evaluate_base": ["train"],
                     "evaluate": ["evaluate_base"], "register": ["evaluate"], "summary": ["register"]}, edges
