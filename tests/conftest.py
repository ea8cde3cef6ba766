"""Test-session isolation: offline hubs, one torch thread, private state folders; ``OPSD_CPU_ISA`` honoured."""

from __future__ import annotations

import os
import random
import tempfile
import zlib
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

from opsd_core.backends.capabilities import apply_isa_cap  # noqa: E402
from opsd_core.config import Params, load_params  # noqa: E402
from opsd_core.offline import apply_offline_defaults  # noqa: E402

# the test session is a process start: OPSD_CPU_ISA's caps before torch runs a kernel (`make test`'s AVX2 pass)
apply_isa_cap()
apply_offline_defaults()

import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402

from tests.file_order import pytest_xdist_make_scheduler  # noqa: E402, F401 (the hook: costliest test file first)

# the fixtures that run Prefect flows, a Prefect server or `dvc repro`: their users are out of the fast lane
# (`make test-fast`, -m "not slow") by this one marker; files that spawn processes mark themselves (pytestmark)
_SLOW_FIXTURES = frozenset({"prefect_harness", "smoke_project", "smoke_first_run"})


@pytest.hookimpl(tryfirst=True)  # before -m deselects (the mark plugin's hook), so the marker counts there
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(tryfirst=True)  # before the test's fixtures are set up, module- and session-scoped ones included
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Each test starts from global random states of its own (seeded from its id), not from whatever the tests
    run before it in this process drew: a test that draws from them (peft's LoRA initialisation, a shuffle)
    sees the same numbers alone and in any order."""
    import numpy as np

    seed = zlib.crc32(item.nodeid.encode())
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """The shuffled order's seed, also under -q (pytest-random-order prints it only in the header)."""
    bucket, seed = (str(config.getoption(name, default="")) for name in ("random_order_bucket", "random_order_seed"))
    if bucket and not bucket.startswith("default:"):
        seed = seed.removeprefix("default:")
        terminalreporter.write_line(f"test order: --random-order-bucket={bucket} --random-order-seed={seed} "
                                    f"(this order again: make test TEST_SEED={seed})")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Params:
    """The smoke profile's params (the tiny model), with a model cache of the test module's own."""
    root = Path(__file__).resolve().parents[1]
    return load_params(root / "params.yaml", "smoke", [f"model.cache_dir={tmp_path_factory.mktemp('models')}"])


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
