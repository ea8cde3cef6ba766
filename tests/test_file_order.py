"""`make test` hands its two workers the costliest test file left (tests/file_order.py)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.file_order import TOGETHER, file_costs
from tests.support import ROOT


def test_costs_are_each_files_total_from_a_junit_report(tmp_path: Path) -> None:
    report = tmp_path / "junit.xml"
    report.write_text('<testsuites><testsuite name="pytest">'
                      '<testcase classname="tests.test_a" name="one" time="1.5"/>'
                      '<testcase classname="tests.test_b" name="one" time="4.0"/>'
                      '<testcase classname="tests.test_a" name="two" time="2.0"/>'
                      "</testsuite></testsuites>")
    assert file_costs(report) == {"tests/test_b.py": 4.0, "tests/test_a.py": 3.5}


def _handout_order(root: Path, tests: dict[str, int], costs: dict[str, float]) -> list[str]:
    """The files under ``root`` (name -> how many tests), with ``costs`` as the recorded durations, in the
    order one xdist worker ran them: with one worker, the order they were handed out."""
    log = root / "started.log"
    for name, count in tests.items():
        body = "".join(f"def test_{i}():\n    open({str(log)!r}, 'a').write({name!r} + '\\n')\n\n" for i in range(count))
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(body)
    durations = root / "durations.json"
    durations.write_text(json.dumps(costs))
    env = {**os.environ, "OPSD_TEST_DURATIONS": str(durations), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.file_order",
                           "-n", "1", "--dist", "loadfile", "--rootdir", str(root),
                           *sorted({str((root / name).parent) for name in tests})],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return list(dict.fromkeys(log.read_text().split()))


@pytest.mark.slow  # a pytest session with an xdist worker
def test_workers_take_the_costliest_file_left(tmp_path: Path) -> None:
    """Six files, their recorded costs in another order than xdist's own (most tests first): a worker gets them
    costliest first, a file without a recorded cost counted at the measured mean per test. One worker, so that
    the order it runs them in is the order they were handed out."""
    costs = {"test_a.py": 1.0, "test_b.py": 90.0, "test_c.py": 10.0, "test_d.py": 50.0, "test_e.py": 5.0}
    tests = {"test_a.py": 6, "test_b.py": 1, "test_c.py": 2, "test_d.py": 1, "test_e.py": 3, "test_f.py": 5}
    # test_f: 5 tests at the measured mean (156 s over 13 tests, 12 s) is 60 s: after test_b, before test_d
    assert _handout_order(tmp_path, tests, costs) == [
        "test_b.py", "test_f.py", "test_d.py", "test_c.py", "test_e.py", "test_a.py"]


@pytest.mark.slow  # a pytest session with an xdist worker
def test_files_that_share_the_first_pipeline_run_are_one_unit_of_work(tmp_path: Path) -> None:
    """The files of a ``TOGETHER`` group are handed out as one unit, at their summed cost: on one worker they
    run back to back, where costliest-first by file would put another file between them."""
    first, second = TOGETHER[0]
    costs = {"tests/test_x.py": 30.0, "tests/test_y.py": 20.0, second: 2.0, "tests/test_z.py": 1.5, first: 1.0}
    order = _handout_order(tmp_path, dict.fromkeys(costs, 2), costs)
    assert order[:2] == ["tests/test_x.py", "tests/test_y.py"] and order[-1] == "tests/test_z.py", order
    assert sorted(order[2:4]) == sorted(TOGETHER[0]), order  # by file alone: y, second, z, first


def test_every_file_that_uses_the_first_pipeline_run_is_grouped() -> None:
    """A file that starts using the session's first pipeline run joins its group, or a second worker makes it."""
    def uses(path: Path) -> bool:  # a test or fixture that takes the run (or the project it reproduces)
        return any(arg.arg in ("smoke_first_run", "smoke_project") for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.FunctionDef) for arg in node.args.args)

    users = sorted(f"tests/{path.name}" for path in (ROOT / "tests").glob("test_*.py") if uses(path))
    assert users == sorted(TOGETHER[0])
