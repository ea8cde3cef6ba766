"""How `opsd` reports errors (flows/cli.py `main`): a user's error is one line and an exit code, a setting
error exits 2 before anything runs, anything else is a bug that keeps its traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flows.cli import main
from opsd_core.algorithm.trainer import TrainingError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A smoke-profile project with nothing prepared and no registry."""
    monkeypatch.delenv("OPSD_DEBUG", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    text = (ROOT / "params.yaml").read_text().replace("profile: default", "profile: smoke", 1)
    text = text.replace("cache_dir: .opsd/models", f"cache_dir: {tmp_path / 'models'}", 1)
    (tmp_path / "params.yaml").write_text(text)
    return tmp_path


def _run(project: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    code = main([*args, "--params", str(project / "params.yaml")])
    return code, capsys.readouterr().err.splitlines()


def test_a_stage_error_is_one_line_naming_the_command_and_type(project: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(project, capsys, "train")  # before prepare: a TrainingError, before any model loads
    train_file = project.resolve() / "data/prepared/train.jsonl"
    assert (code, err) == (1, [f"opsd train: TrainingError: {train_file} does not exist: run `opsd prepare` first"])
    assert not (project / "models").exists()

    code, err = _run(project, capsys, "promote", "--rollback")  # a RegistryError: nothing registered yet
    assert code == 1 and len(err) == 1
    assert err[0].startswith("opsd promote: RegistryError: no registry at sqlite:///")
    assert err[0].endswith("yet: nothing to roll back")
    assert not (project / ".opsd/mlflow.db").exists()


def test_setting_errors_print_opsd_and_the_message_and_exit_2(project: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(project, capsys, "train", "--set", "train.stepz=3")  # a ConfigError: one line per bad key
    assert (code, err) == (2, [f"opsd: invalid configuration in {project / 'params.yaml'} and --set:",
                               "  train.stepz: unknown key (from --set)"])

    code, err = _run(project, capsys, "promote")
    assert (code, err) == (2, ["opsd: promote: only --rollback is supported; promotion goes through the gate"])

    # a CapabilityError (a SettingError too): a device this machine does not have, decided before any work
    device = "cuda" if not torch.cuda.is_available() else "mps"
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has both CUDA and MPS")
    prepared = project / "data/prepared"
    prepared.mkdir(parents=True)
    (prepared / "train.jsonl").write_text(json.dumps({"id": "a", "problem": "1+1?", "solution": "#### 2"}) + "\n")
    code, err = _run(project, capsys, "train", "--set", f"train.device={device}")
    assert code == 2 and len(err) == 1 and err[0].startswith(f"opsd: train.device={device}: no ")
    assert not (project / "models").exists()


def test_opsd_debug_shows_the_traceback_of_a_user_error(project: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("OPSD_DEBUG", "1")
    with pytest.raises(TrainingError, match="does not exist: run `opsd prepare` first"):
        main(["train", "--params", str(project / "params.yaml")])
    assert capsys.readouterr().err == ""


def test_any_other_exception_is_reported_as_a_bug_and_re_raised(project: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    import opsd_core.stages.prepare

    def broken(params: object, root: Path) -> dict:
        return {"rows": 1 // 0}

    monkeypatch.setattr(opsd_core.stages.prepare, "prepare", broken)
    with pytest.raises(ZeroDivisionError):
        main(["prepare", "--params", str(project / "params.yaml")])
    err = capsys.readouterr().err.splitlines()
    assert err == ["opsd prepare: an internal error (a bug in opsd, not in your data or settings); "
                   "please report it with the traceback below"]


def test_a_tiny_model_shape_that_cannot_be_built_is_a_setting_error(project: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(project, capsys, "prepare", "--set", "model.tiny.hidden=66")
    assert code == 2 and len(err) == 1 and "model.tiny.hidden" in err[0] and "internal error" not in err[0]
