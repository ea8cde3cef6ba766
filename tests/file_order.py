"""The order `make test` hands test files to its pytest-xdist workers: costliest first.

With ``--dist loadfile`` a file runs whole on one worker, and xdist's own order (most tests first) leaves the
files with one or two long tests (a GPU-run rehearsal, a deployment on a team's servers, `opsd run` on a fresh
clone) to the end, where one worker runs them while the other has nothing left. Handing out the costliest
remaining file each time (longest-processing-time first) ends both workers close together.

Files that share a costly session fixture run on one worker, as one unit (``TOGETHER``): the first pipeline run
(conftest.py: ``smoke_first_run``, ~45 s) is then made once, not once per worker that needs it.

The costs are each file's measured seconds (setup, call and teardown of its tests) in ``durations.json``,
written from a JUnit report: ``python -m tests.file_order REPORT.xml``. A file missing there costs the mean
per test of the measured ones times its test count.
"""

from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pytest
from xdist.remote import Producer
from xdist.scheduler import LoadFileScheduling
from xdist.workermanage import WorkerController

DURATIONS = Path(os.environ.get("OPSD_TEST_DURATIONS") or Path(__file__).with_name("durations.json"))
# the files that use the session's first pipeline run (tests/test_file_order.py checks that this is all of them)
TOGETHER = (("tests/test_pipeline.py", "tests/test_schedule.py"),)


def file_costs(junit: Path) -> dict[str, float]:
    """Seconds per test file (``tests/test_x.py``) in a JUnit report (pytest's ``junit_duration_report=total``)."""
    costs: Counter[str] = Counter()
    for case in ET.parse(junit).getroot().iter("testcase"):
        costs[case.get("classname", "").replace(".", "/") + ".py"] += float(case.get("time") or 0)
    return {name: round(seconds, 1) for name, seconds in costs.most_common()}


class CostliestFileFirst(LoadFileScheduling):
    """xdist's file scheduling, but each free worker gets the costliest file left."""

    def __init__(self, config: pytest.Config, log: Producer | None = None) -> None:
        super().__init__(config, log)
        self.costs: dict[str, float] = json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}
        self.per_test = 1.0  # a file without a recorded cost: this times its tests (measured at the first hand-out)
        self.first = True

    def _split_scope(self, nodeid: str) -> str:
        """A test's unit of work: its file, or the files it runs ``TOGETHER`` with, joined by ``+``."""
        scope = super()._split_scope(nodeid)
        return next(("+".join(group) for group in TOGETHER if scope in group), scope)

    def recorded(self, scope: str) -> float | None:
        """The unit's seconds in ``durations.json`` (its files' sum), or None if a file has none."""
        files = scope.split("+")
        return sum(self.costs[name] for name in files) if all(name in self.costs for name in files) else None

    def cost(self, scope: str) -> float:
        seconds = self.recorded(scope)
        return self.per_test * len(self.workqueue[scope]) if seconds is None else seconds

    def _assign_work_unit(self, node: WorkerController) -> None:
        if self.first:  # the queue holds every file
            known = {scope: (seconds, len(tests)) for scope, tests in self.workqueue.items()
                     if (seconds := self.recorded(scope)) is not None}
            if known:
                self.per_test = sum(s for s, _ in known.values()) / sum(n for _, n in known.values())
            self.first = False
        costliest = max(self.workqueue, key=self.cost)
        self.workqueue.move_to_end(costliest, last=False)  # xdist's own step takes the queue's first
        super()._assign_work_unit(node)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Producer) -> LoadFileScheduling | None:
    """``--dist loadfile`` costliest first; any other mode as xdist has it."""
    return CostliestFileFirst(config, log) if config.getoption("dist") == "loadfile" else None


def main(argv: list[str]) -> int:
    (junit,) = argv
    DURATIONS.write_text(json.dumps(file_costs(Path(junit)), indent=1) + "\n")
    print(f"{DURATIONS}: {len(json.loads(DURATIONS.read_text()))} files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
