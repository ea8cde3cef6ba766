"""`opsd run` as a user runs it: a fresh clone, a first run killed, `opsd status`, the main job twice (the second
a no-op)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import BIN, ROOT

pytestmark = pytest.mark.slow  # `opsd run` and `opsd status` subprocesses, Prefect: out of the fast lane (make test-fast)


def opsd(project: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **(env or {}), "PATH": os.pathsep.join([BIN, os.environ.get("PATH", "")])}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=900)


def test_main_job_on_a_fresh_clone_after_a_killed_try_then_a_no_op_rerun(tmp_path: Path,
                                                                         prefect_harness: None) -> None:
    """The main job as a user meets it, crash accounting included (one clone and one pipeline for both: each
    costs ~60 s): the first `opsd run` dies (SIGKILL, OOM, power loss) once its pipeline run has started; the
    next `opsd status` marks that run FAILED; the next `opsd run` reproduces everything and registers once, and
    a rerun is a no-op. The first two start Prefect's temporary server, as a new user's do; the rerun goes to
    the session's running server (`PREFECT_API_URL`, as a configured user's does) instead of starting a third."""
    from mlflow.tracking import MlflowClient
    from prefect.settings import PREFECT_API_URL

    from benchmarks.common import fresh_smoke_clone
    from opsd_core.config import load_params
    from opsd_core.registry import leases
    from opsd_core.registry.store import resolve_store

    project = fresh_smoke_clone(tmp_path / "clone", tmp_path / "models", with_dvc_config=True)
    params = load_params(project / "params.yaml")
    store = resolve_store(params, project)

    refused = opsd(project, "run", "--profile", "gpu")
    assert refused.returncode == 2 and "params.yaml" in refused.stderr

    env = {**os.environ, "PATH": os.pathsep.join([BIN, os.environ.get("PATH", "")])}
    env.pop("PREFECT_HOME")  # the default: Prefect's history inside the project, not in ~/.prefect
    killed_log = tmp_path / "killed.log"  # a file, not a pipe: a full pipe would stall the flow
    with killed_log.open("w") as out:
        flow = subprocess.Popen([sys.executable, "-m", "flows.cli", "run"], cwd=project, env=env,
                                start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not list(leases.lease_dir(store.state_dir).glob("*.lease")):  # the pipeline run has started
        assert flow.poll() is None, f"the flow ended before its pipeline run started:\n{killed_log.read_text()}"
        assert time.monotonic() < deadline, "no pipeline run started within 300 s"
        time.sleep(0.2)
    os.killpg(flow.pid, signal.SIGKILL)  # the flow and everything it started, with no cleanup
    flow.wait(timeout=60)
    assert "generated the bundled dataset" in killed_log.read_text()  # the first run on a fresh clone
    client = MlflowClient(store.tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["RUNNING"]  # what a crash leaves behind
    assert (project / ".opsd" / "prefect" / "prefect.db").is_file()

    status = opsd(project, "status")
    assert status.returncode == 0, status.stderr[-2000:]
    assert f"pipeline run {runs[0].info.run_id} marked FAILED" in status.stdout
    assert client.get_run(runs[0].info.run_id).info.status == "FAILED"

    first = opsd(project, "run")
    assert first.returncode == 0, first.stderr[-4000:]
    # the killed run registered nothing; this one registered its candidate once
    assert len(client.search_model_versions(f"name='{params.registry.model_name}'")) == 1
    statuses = sorted(r.info.status for r in client.search_runs(runs[0].info.experiment_id))
    assert statuses == ["FAILED", "FINISHED"]
    # the terminal (not a TTY here): a few dozen lines, each stage's progress while it runs (the trainer's
    # steps by quarters), a "done" line with its figure per stage; no Prefect prefixes, JSON dumps or DVC hints
    terminal = first.stdout + first.stderr
    assert len(terminal.splitlines()) < 60, terminal
    assert not re.search(r"\| (INFO|DEBUG) +\||^\s*[{}]\s*$|^\s*(\w+: +)?\"\w+\":|dvc push|git add", terminal,
                         re.MULTILINE), terminal
    assert "  train: step 1/4 loss=" in terminal and "  train: step 4/4 loss=" in terminal
    assert re.search(r"^train: done in \d+ s: 4 steps, loss [\d.e-]+ -> [\d.e-]+$", terminal, re.MULTILINE), terminal
    assert re.search(r"^prepare: done in \d+ s: \d+ of \d+ rows kept \(train \d+, val \d+\)", terminal, re.MULTILINE)
    assert re.search(r"^register: done in \d+ s: v1, gate: (not )?promoted$", terminal, re.MULTILINE), terminal
    # evaluation's progress, group by group: the time elapsed, and for the candidate an estimate of the rest
    # from the base's own groups (evaluate_base timed them with the same settings and keeps them in its report)
    # (two kinds with eval.backend opsd: generation, then both log-likelihood cuts from one forward per problem)
    assert "  evaluate_base: 2/2 groups of tasks done in " in terminal
    assert re.search(r"  evaluate: 2 groups of tasks to run, about \d+ s \(as long as the base's", terminal)
    assert re.search(r"  evaluate: 1/2 groups of tasks done, elapsed \d+ s, about \d+ s left", terminal)
    assert set(json.loads((project / "reports/eval_base.json").read_text())["group_s"]) == {
        "generation", "log-likelihood"}
    assert re.search(r"opsd run: done in \d+ s; stages run: prepare, train, evaluate_base, evaluate, register",
                     first.stdout)
    # commands that work as printed, outside the virtual environment too
    ui = re.search(r"MLflow UI: (\S+) ui --backend-store-uri sqlite:///", first.stdout)
    assert ui and os.access(ui.group(1) if os.path.isabs(ui.group(1)) else project / ui.group(1), os.X_OK)
    registry = json.loads((project / "reports/registry.json").read_text())
    assert (f"(then open http://127.0.0.1:5000/#/experiments/{registry['experiment_id']}/runs/{registry['run_id']}"
            "?workflowType=machine_learning)") in first.stdout  # the run in MLflow's model-training view
    # the gate's decision in words, on the continuous metric, with exact match as guards
    assert re.search(r"vs base on opsd_val_ll: [+-][\d.]+ \[[+-][\d.]+, [+-][\d.]+\], (better|worse|no difference)",
                     first.stdout), first.stdout
    assert "guard opsd_val:" in first.stdout
    assert "gate: promoted to champion" in first.stdout or "gate: not promoted" in first.stdout
    assert (project / "data/raw.dvc").is_file() and (project / "reports/registry.json").is_file()

    # what DVC shows: metrics are a small table of numbers, the plots render without a warning
    shown = subprocess.run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], cwd=project,
                           capture_output=True, text=True, timeout=300, check=True)
    assert len(shown.stdout) < 4000, len(shown.stdout)
    metrics = json.loads(shown.stdout)[""]["data"]
    eval_metrics = metrics["reports/metrics/eval.json"]["data"]
    assert all(set(row) == {"candidate", "gain"} for row in eval_metrics.values()), eval_metrics
    assert set(metrics["reports/metrics/train.json"]["data"]) <= {"steps", "first_loss", "final_loss", "wall_s",
                                                                  "teacher_gap"}
    assert metrics["reports/metrics/train.json"]["data"]["steps"] == 4
    gate = metrics["reports/metrics/gate.json"]["data"]  # what the gate decided on, as the summary printed it
    assert gate["promoted"] == int("gate: promoted to champion" in first.stdout)
    assert gate["gain_ci_low"] <= gate["gain"] <= gate["gain_ci_high"]
    table = subprocess.run([sys.executable, "-m", "dvc", "metrics", "show"], cwd=project, capture_output=True,
                           text=True, timeout=300, check=True).stdout
    # a compact table: ~1,960-character lines and ~60 columns before it was trimmed to these files
    columns = sum(_leaves(got["data"]) for got in metrics.values())
    assert columns <= 30 and max(map(len, table.splitlines())) < 800, (columns, table)
    # the plots page renders offline: the stages' PNGs, no charting library fetched from a CDN
    plots = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "-o", str(tmp_path / "plots")],
                           cwd=project, capture_output=True, text=True, timeout=300)
    assert plots.returncode == 0 and "WARNING" not in plots.stderr + plots.stdout, plots.stderr[-2000:]
    page = (tmp_path / "plots" / "index.html").read_text()
    assert page.count("<img") == 2 and "http" not in page.replace("http-equiv", ""), page[:2000]
    for png in ("reports/plots/training_curve.png", "reports/plots/eval.png"):
        assert (project / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    second = opsd(project, "run", env={"PREFECT_API_URL": str(PREFECT_API_URL.value())})
    assert second.returncode == 0, second.stderr[-4000:]
    assert "nothing changed, no stage ran" in second.stdout

    registry = json.loads((project / "reports/registry.json").read_text())
    assert registry["challenger"] == registry["version"]
    status = opsd(project, "status")
    assert status.returncode == 0, status.stderr[-2000:]
    lines = status.stdout.splitlines()
    # the version, content hash and base of each alias, and the primary task's scores from eval.json
    described = f"v{registry['version']}  {registry['content_hash'][:16]}  base tiny"
    assert f"challenger: {described}" in lines, status.stdout
    if registry["promoted"]:  # no earlier champion: the first candidate is the champion only if the gate passed
        assert registry["champion"] == registry["version"] and f"champion  : {described}" in lines, status.stdout
    else:
        assert registry["champion"] is None and "champion  : none" in lines, status.stdout
    scores = json.loads((project / "reports/eval.json").read_text())["tasks"]["opsd_val_ll"]
    assert any(line.strip().startswith(f"opsd_val_ll: candidate {scores['candidate']['score']:.6g} vs base "
                                       f"{scores['base']['score']:.6g} (diff ") for line in lines), status.stdout
    # one pipeline run promotes at most once: there is no earlier champion, and it says so in one line
    rollback = opsd(project, "promote", "--rollback")
    assert rollback.returncode == 1 and "RegistryError" in rollback.stderr, rollback.stderr[-2000:]
    no_gate_bypass = opsd(project, "promote")
    assert no_gate_bypass.returncode == 2 and "--rollback" in no_gate_bypass.stderr


def test_small_commands_do_not_import_torch(tmp_path: Path) -> None:
    """`opsd status`, `promote` and friends read the registry only: loading torch cost them ~1.5 s each. `opsd
    register` writes the MLflow model (which MLflow runs, as code, at save time too) without loading it: torch
    and transformers cost it ~4 CPU-s a version."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "candidate").mkdir()
    (tmp_path / "candidate" / "adapter_config.json").write_text("{}")
    code = ("import sys; from pathlib import Path; from flows.cli import main; rc = main(['status']); "
            "import opsd_core.stages.register; from opsd_core.registry.pyfunc import save; "
            "save(Path('version'), Path('candidate'), {'base_model': 'tiny'}, 8, None); "
            "assert Path('version/MLmodel').is_file(); "
            "print('TORCH' if {'torch', 'transformers'} & set(sys.modules) else 'NO-TORCH', rc)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert proc.stdout.strip().splitlines()[-1] == "NO-TORCH 0", proc.stdout + proc.stderr[-2000:]


def _leaves(tree: object) -> int:
    """How many numbers a metrics file holds: one column each in `dvc metrics show`."""
    return sum(_leaves(v) for v in tree.values()) if isinstance(tree, dict) else 1
