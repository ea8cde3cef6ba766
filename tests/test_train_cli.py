"""`opsd data generate → prepare → train` as separate processes, with a killed and resumed run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.faults import kill_after_checkpoint
from tests.support import cli_project, opsd

pytestmark = pytest.mark.slow  # `opsd` CLI subprocesses: out of the fast lane (make test-fast)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("models")
    project = cli_project(tmp_path_factory.mktemp("project"), cache)
    opsd(project, "data", "generate")
    opsd(project, "prepare")
    return project


def _clone(src: Path, dst: Path, overrides: list[str]) -> Path:
    dst.mkdir()
    shutil.copy(src / "params.yaml", dst)
    shutil.copytree(src / "data", dst / "data")
    shutil.copytree(src / "reports", dst / "reports")
    return dst


def _weights(project: Path) -> str:
    return json.loads((project / "models/candidate/opsd_candidate.json").read_text())["content_hash"]


def test_prepare_writes_splits_and_reports(prepared: Path) -> None:
    report = json.loads((prepared / "reports/data.json").read_text())
    assert report["train"] > 0 and report["val"] > 0
    assert (prepared / "data/prepared/train.jsonl").is_file()
    assert (prepared / "data/eval/gsm8k100.jsonl").is_file()


def test_killed_run_resumes_to_the_same_weights(prepared: Path, tmp_path: Path) -> None:
    sets = ["--set", "train.steps=4", "--set", "train.checkpoint_every=1"]
    straight = _clone(prepared, tmp_path / "straight", sets)
    log = opsd(straight, "train", *sets).stderr.splitlines()
    # each step's line says how long the run has taken and, from this run's mean step, how long is left
    steps = [line for line in log if line.startswith("step ")]
    assert len(steps) == 4 and all(" elapsed " in line for line in steps)
    assert all(line.endswith(" s left") for line in steps[:3]) and not steps[3].endswith(" s left")

    crashed = _clone(prepared, tmp_path / "crashed", sets)
    killed = opsd(crashed, "train", *sets, env=kill_after_checkpoint(2), check=False)
    assert killed.returncode == -9  # SIGKILL: a real crash, no cleanup code ran
    assert not (crashed / "models/candidate").exists()
    resumed = opsd(crashed, "train", *sets)
    assert "resumed from" in resumed.stderr and "step 2/4" in resumed.stderr

    assert _weights(crashed) == _weights(straight)
    curve_a = (straight / "reports/train_curve.csv").read_text()
    curve_b = (crashed / "reports/train_curve.csv").read_text()
    drop_speed = [",".join(r.split(",")[:6]) for r in curve_a.splitlines()]
    assert drop_speed == [",".join(r.split(",")[:6]) for r in curve_b.splitlines()]
    summary = json.loads((crashed / "reports/train.json").read_text())
    assert summary["steps"] == 4
    meta = json.loads((crashed / "models/candidate/opsd_candidate.json").read_text())
    assert meta["adapter"] is True and (crashed / "models/candidate/adapter_model.safetensors").is_file()


def test_changed_params_never_resume_a_foreign_checkpoint(prepared: Path, tmp_path: Path) -> None:
    project = _clone(prepared, tmp_path / "p", [])
    opsd(project, "train", "--set", "train.steps=2")
    other = opsd(project, "train", "--set", "train.steps=2", "--set", "train.lr=0.001")
    assert "resumed from" not in other.stderr


def test_config_errors_name_the_key(prepared: Path) -> None:
    bad = opsd(prepared, "train", "--set", "train.stepz=3", check=False)
    assert bad.returncode == 2 and "train.stepz: unknown key" in bad.stderr
    wrong = opsd(prepared, "train", "--set", "opsd.divergence=kl", check=False)
    assert wrong.returncode == 2 and "opsd.divergence" in wrong.stderr
    profile = opsd(prepared, "train", "--profile", "nope", check=False)
    assert profile.returncode == 2 and "unknown profile 'nope'" in profile.stderr


def test_full_finetuning_writes_and_verifies_full_weights(prepared: Path, tmp_path: Path) -> None:
    project = _clone(prepared, tmp_path / "full", [])
    opsd(project, "train", "--set", "train.steps=1", "--set", "lora.enabled=false", "--set", "train.lr=1e-3")
    meta = json.loads((project / "models/candidate/opsd_candidate.json").read_text())
    assert meta["adapter"] is False
    assert (project / "models/candidate/model.safetensors").is_file()
    assert not (project / "models/candidate/adapter_config.json").exists()


def test_train_before_prepare_says_what_to_run_without_loading_a_model(tmp_path: Path) -> None:
    project = cli_project(tmp_path / "fresh", tmp_path / "models")
    proc = opsd(project, "train", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].endswith("train.jsonl does not exist: run `opsd prepare` first")
    models = tmp_path / "models"
    assert len(proc.stderr.strip().splitlines()) == 1 and not (models.exists() and any(models.iterdir()))
