"""The study's rows as DVC experiments (benchmarks/study/dvc.yaml, benchmarks/study_experiment.py): real
`dvc exp run` in a temporary git repository on the tiny model; `dvc exp show` lists each row with its numbers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks.study_experiment import StudyRow
from tests.servers import BIN

pytestmark = pytest.mark.slow  # dvc and training subprocesses

REPO = Path(__file__).resolve().parents[1]
PARAMS = "benchmarks/study/params.yaml"


def test_each_study_row_is_an_experiment_that_exp_show_lists_with_its_numbers(tmp_path: Path) -> None:
    (tmp_path / "benchmarks").mkdir()
    shutil.copytree(REPO / "benchmarks/study", tmp_path / "benchmarks/study")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

    def sh(*cmd: str) -> str:
        proc = subprocess.run(list(cmd), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
        return proc.stdout

    sh("git", "init", "-q")
    sh(str(BIN / "dvc"), "init", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "study")
    for arm in ("sft", "opsd_after_sft"):  # the second row reuses the cell's SFT model (per-arm resume)
        sh(str(BIN / "dvc"), "exp", "run", "-q", "benchmarks/study/dvc.yaml", "--name", arm,
           "-S", f"{PARAMS}:study.model=tiny", "-S", f"{PARAMS}:study.steps=1", "-S", f"{PARAMS}:study.max_number=9",
           "-S", f"{PARAMS}:study.arm={arm}")
    shown = json.loads(sh(str(BIN / "dvc"), "exp", "show", "--json"))
    rows = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp["revs"]:
                data = rev["data"]
                rows[rev["name"]] = (data["params"][PARAMS]["data"]["study"],
                                     data["metrics"]["benchmarks/study/metrics.json"]["data"])
    assert set(rows) == {"sft", "opsd_after_sft"}, shown
    for arm, (study, metrics) in rows.items():
        assert study["arm"] == arm and study["model"] == "tiny" and (study["steps"], study["max_number"]) == (1, 9)
        assert 0.0 <= metrics["strict"] <= metrics["flex"] <= 1.0
        assert metrics["gain_ci_low"] <= metrics["gain_flex"] <= metrics["gain_ci_high"]
    assert "gap_before" in rows["opsd_after_sft"][1]
    cell = json.loads((tmp_path / "benchmarks/study/cell.json").read_text())["cells"][0]
    assert set(cell["runs"]) == {"base", "sft", "opsd_after_sft"} and cell["runs"]["opsd_after_sft"]["vs"] == "sft"
    assert (tmp_path / ".opsd/study/s1-n9-d0-seed0/sft.result.json").is_file()


@pytest.mark.parametrize(("key", "value", "said"), [
    ("arm", "opsd", "study.arm is 'opsd', expected one of"),
    ("steps", "2:50", "study.steps is '2:50', expected a whole number"),
    ("seed", "one", "study.seed is 'one', expected a whole number"),
])
def test_a_bad_study_row_is_named_with_its_file_and_key(tmp_path: Path, key: str, value: str, said: str) -> None:
    import yaml

    tree = yaml.safe_load((REPO / PARAMS).read_text())
    tree["study"][key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(ValueError, match=f"^{path}: ") as err:
        StudyRow.load(path)
    assert said in str(err.value)
    assert StudyRow.load(REPO / PARAMS).arm == "opsd_after_sft"
