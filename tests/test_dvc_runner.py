"""The DVC runner: stage output streams line by line while the stage runs; the stage list is dvc.yaml's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.dvc import StageError, dvc, stage_names

pytestmark = pytest.mark.slow  # DVC and stage subprocesses: out of the fast lane (make test-fast)

ROOT = Path(__file__).resolve().parents[1]

# prints one line, then waits (up to 60 s) for the reader to answer by creating `go`, then prints another:
# it can only finish if its first line reached the caller before it ended
WAITER = ("import os, sys, time\n"
          "print('first line', flush=True)\n"
          "deadline = time.time() + 60\n"
          "while not os.path.exists('go'):\n"
          "    if time.time() > deadline: sys.exit('nobody saw the first line')\n"
          "    time.sleep(0.05)\n"
          "print('second line')\n")


# a stage whose own child (like `opsd train` under DVC) runs long and announces its pid
SPAWNER = ("import subprocess, sys, time\n"
           "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
           "print(f'child {child.pid}', flush=True)\n"
           "time.sleep(300)\n")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    dvc(["init", "-q"], tmp_path)
    (tmp_path / "waiter.py").write_text(WAITER)
    (tmp_path / "spawner.py").write_text(SPAWNER)
    stages = {"stages": {"wait": {"cmd": f"{sys.executable} waiter.py"},
                         "spawn": {"cmd": f"{sys.executable} spawner.py"},
                         "fail": {"cmd": f"{sys.executable} -c \"import sys; print('boom'); sys.exit(3)\""}}}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(stages, sort_keys=False))
    return tmp_path


def test_stage_lines_arrive_while_the_stage_runs(repo: Path) -> None:
    seen: list[str] = []

    def on_line(line: str) -> None:
        seen.append(line)
        if line == "first line":
            (repo / "go").touch()

    out = dvc(["repro", "--single-item", "wait"], repo, on_line=on_line)
    assert "first line" in seen and "second line" in seen
    assert seen.index("first line") < seen.index("second line")
    assert "second line" in out


def test_a_failing_stage_raises_with_its_output(repo: Path) -> None:
    with pytest.raises(StageError, match=r"(?s)exit \d+.*boom"):
        dvc(["repro", "--single-item", "fail"], repo)


def test_the_flow_runs_the_stages_of_dvc_yaml_in_order(tmp_path: Path) -> None:
    assert stage_names(ROOT) == ["prepare", "train", "evaluate_base", "evaluate", "register"]
    assert stage_names(ROOT) == list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    with pytest.raises(StageError, match="dvc.yaml"):
        stage_names(tmp_path)


def test_an_interrupted_stage_leaves_no_process_behind(repo: Path) -> None:
    """The caller stops (SIGTERM's SystemExit, Ctrl-C, a cancelled task): DVC, the stage and the stage's
    own children go with it."""
    import os
    import time

    pids: list[int] = []

    def on_line(line: str) -> None:
        if line.startswith("child "):
            pids.append(int(line.split()[1]))
            raise KeyboardInterrupt  # what Ctrl-C raises in the flow's thread

    with pytest.raises(KeyboardInterrupt):
        dvc(["repro", "--single-item", "spawn"], repo, on_line=on_line)
    assert len(pids) == 1
    deadline = time.monotonic() + 30
    while True:
        try:
            os.kill(pids[0], 0)
        except ProcessLookupError:
            break  # gone
        try:  # reaped by init once orphaned, or a zombie of a parent that is itself gone
            with open(f"/proc/{pids[0]}/stat") as fh:
                if fh.read().split()[2] == "Z":
                    break
        except FileNotFoundError:
            break
        assert time.monotonic() < deadline, "the stage's child outlived the interrupted stage"
        time.sleep(0.1)  # waiting for the signal to take effect
