"""Test-session isolation: offline hubs, one torch thread, private state folders."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

_STATE = tempfile.mkdtemp(prefix="opsd-tests-")
for key, value in {
    "HF_HOME": os.path.join(_STATE, "hf"),
    "PREFECT_HOME": os.path.join(_STATE, "prefect"),
    "PREFECT_RESULTS_LOCAL_STORAGE_PATH": os.path.join(_STATE, "prefect-results"),
    "OMP_NUM_THREADS": "1",
}.items():
    os.environ.setdefault(key, value)

from opsd_core.offline import apply_offline_defaults  # noqa: E402

apply_offline_defaults()

import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness():
    """One isolated temporary Prefect server for the whole session (start-up costs 10-20 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield



@pytest.fixture(scope="session")
def smoke_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A committed fresh smoke project; ``smoke_first_run`` reproduces it. Shared by the session: the tests
    that would leave it unreproduced work on a copy (tests/projects.py: copy_project)."""
    from tests.projects import committed_smoke_project

    return committed_smoke_project(tmp_path_factory.mktemp("pipeline") / "repo", tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def smoke_first_run(smoke_project: Path, prefect_harness: None) -> dict[str, Any]:
    """The first pipeline run on ``smoke_project``: every stage once, a version registered (~45-60 s)."""
    from tests.projects import first_pipeline_run

    return first_pipeline_run(smoke_project)
