"""`opsd run`'s first-run set-up in a fresh clone (flows/bootstrap.py), with real git and DVC: the data version
the checkout names is pulled from the DVC remote; the bundled data is generated only when that version cannot
be pulled, and never replaces a version it is not."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from flows.bootstrap import bootstrap
from flows.dvc import StageError
from opsd_core.config import load_params
from tests.servers import BIN

pytestmark = pytest.mark.slow  # git and dvc subprocesses

REPO = Path(__file__).resolve().parents[1]
ROW = {"id": "team-1", "problem": "Ada has 2 pens and buys 3 more. How many?", "solution": "2 + 3 = 5\n#### 5",
       "answer": "5"}


def _sh(cwd: Path, *cmd: str) -> None:
    subprocess.run(list(cmd), cwd=cwd, check=True, capture_output=True, timeout=300)


def _team_project(path: Path, remote: Path) -> Path:
    """A team's project: its own traces in data/raw, versioned and pushed to ``remote``, committed."""
    path.mkdir()
    for name in ("params.yaml", "dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, path / name)
    _sh(path, "git", "init", "-q")
    _sh(path, str(BIN / "dvc"), "init", "-q")
    _sh(path, str(BIN / "dvc"), "remote", "add", "-d", "team", str(remote))
    (path / "data/raw").mkdir(parents=True)
    (path / "data/raw/team.jsonl").write_text(json.dumps(ROW) + "\n")
    _sh(path, str(BIN / "dvc"), "add", "-q", "data/raw")
    _sh(path, str(BIN / "dvc"), "push", "-q")
    _sh(path, "git", "add", "-A")
    _sh(path, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "team data")
    return path


def test_a_fresh_clone_pulls_the_data_version_it_names(tmp_path: Path) -> None:
    origin = _team_project(tmp_path / "origin", tmp_path / "remote")
    clone = tmp_path / "clone"
    _sh(tmp_path, "git", "clone", "-q", str(origin), str(clone))
    done = bootstrap(load_params(clone / "params.yaml"), clone)
    assert "generated" not in done and done["pulled"]
    assert (clone / "data/raw/team.jsonl").read_bytes() == (origin / "data/raw/team.jsonl").read_bytes()
    assert (clone / "data/raw.dvc").read_text() == (origin / "data/raw.dvc").read_text()


def test_a_version_that_cannot_be_pulled_is_not_replaced_by_the_bundled_data(tmp_path: Path) -> None:
    origin = _team_project(tmp_path / "origin", tmp_path / "remote")
    clone = tmp_path / "clone"
    _sh(tmp_path, "git", "clone", "-q", str(origin), str(clone))
    shutil.rmtree(tmp_path / "remote")  # the remote does not hold the version (unreachable, emptied)
    named = (clone / "data/raw.dvc").read_text()
    with pytest.raises(StageError) as err:
        bootstrap(load_params(clone / "params.yaml"), clone)
    said = str(err.value)
    assert said.startswith(f"{clone / 'data/raw.dvc'} names the data version ") and "could not pull (" in said
    assert "`dvc pull raw.dvc`" in said and "`dvc add data/raw`" in said
    assert (clone / "data/raw.dvc").read_text() == named  # the checkout still names the team's version


def test_the_repositorys_own_version_is_the_bundled_data_so_a_fresh_clone_generates_it(tmp_path: Path) -> None:
    """This repository's data/raw.dvc names the bundled data: a fresh clone has an empty local remote, cannot
    pull, generates the data (byte-reproducible) and ends with the same version named."""
    clone = tmp_path / "clone"
    _sh(tmp_path, "git", "clone", "-q", str(REPO), str(clone))
    named = (clone / "data/raw.dvc").read_text()
    done = bootstrap(load_params(clone / "params.yaml"), clone)
    assert "generated" in done and "pulled" not in done
    assert (clone / "data/raw.dvc").read_text() == named
