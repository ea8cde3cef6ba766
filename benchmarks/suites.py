"""The suites: which cases run, at which sizes, how often, in which order.

A plan is a flat list of case runs. Training-step comparisons repeat each implementation in its own
process, alternating the order every repeat (opsd, trl, naive / naive, trl, opsd / ...), so that slow
drift of the machine (other jobs, thermal state) hits both sides alike; ratios are taken pair by pair
(repeat i of opsd against repeat i of TRL). Kernel cases alternate chunked/naive the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# (vocabulary, hidden): SmolLM2-135M's head, and a Qwen3-size 152k vocabulary
SMOLLM2_HEAD = (49152, 576)
# opsd in TRL's fp32 (``opsd``), with its CPU fast paths (``opsd_bf16s``: bf16 rollouts; ``opsd_fast``: also
# the frozen base's products in bf16), TRL in fp32 and at its default bf16 autocast, the naive reference
CPU_IMPLS = ("opsd", "opsd_bf16s", "opsd_fast", "trl", "trl_bf16", "naive")
# the rollout paths the GPU suites time (benchmarks.static_generate's names)
GPU_SAMPLING_PATHS = ("opsd static sampler (row noise)", "opsd static sampler, top_k 0 (nucleus)",
                      "generate, dynamic cache", "generate, static cache, compiled")


@dataclass
class Suite:
    name: str
    device: str
    threads: int
    precision: str
    matmul: dict[str, Any]
    step_groups: list[dict[str, Any]] = field(default_factory=list)
    default_profile: dict[str, Any] | None = None
    loss_only: list[dict[str, Any]] = field(default_factory=list)
    kernel: dict[str, Any] | None = None
    sampling: list[dict[str, Any]] = field(default_factory=list)  # benchmarks.static_generate specs
    breakdown: list[dict[str, Any]] = field(default_factory=list)  # benchmarks.breakdown specs
    # the sections in the order they run: a time budget cuts the last ones ("steps:N", "sampling:N",
    # "breakdown:N": entry N of that list alone)
    order: tuple[str, ...] = ("matmul", "steps", "default", "sampling", "breakdown", "loss_only", "kernel")
    smoke: bool = False  # toy sizes: the case list of a GPU suite, its numbers meaningless


def _step_group(model: str, repeats: int, rollouts: int, micro_batch: int, new_tokens: int, warmup: int,
                steps: int, impls: tuple[str, ...] = ("opsd", "trl", "naive"), role: str | None = None) -> dict[str, Any]:
    group = {"model": model, "repeats": repeats, "impls": list(impls), "rollouts": rollouts,
             "micro_batch": micro_batch, "new_tokens": new_tokens, "warmup": warmup, "steps": steps,
             "lora_r": 16, "lora_alpha": 32}
    if role:  # which target the group answers (benchmarks.report.targets), whatever its size
        group["role"] = role
    return group


def build_suite(name: str, threads: int | None = None, large_model: str | None = None, device: str | None = None,
                smoke: bool = False) -> Suite:
    """Suite ``name``; ``device`` runs a GPU suite elsewhere (``cpu``: the rehearsal of the GPU run), ``smoke``
    scales a GPU suite down to toy sizes with the same case list (:func:`smoke_scaled`)."""
    if smoke and name not in ("gpu", "gpu2"):
        raise ValueError(f"--smoke scales the GPU suites (gpu, gpu2), not {name!r}")
    if name == "quick":  # the smoke test: every case kind once, at toy sizes (about 20 s unloaded)
        return Suite(
            name, "cpu", threads or 1, "float32",
            matmul={"size": 128, "dtype": "float32", "repeats": 2},
            step_groups=[_step_group("tiny", 1, 2, 1, 4, 0, 1, impls=("opsd", "trl", "trl_bf16"))],
            kernel={"heads": [(512, 64)], "rows": [64], "impls": ["chunked", "naive"], "repeats": 2,
                    "chunk": 16, "naive_cap_gb": 1.0},
            sampling=[{"model": "tiny", "batches": [2], "new_tokens": 4, "dtype": "float32", "repeats": 1,
                       "compile": False}],
            breakdown=[{**_step_group("tiny", 1, 2, 1, 4, 1, 1), "impl": "opsd", "precision": "float32",
                        "repeats": 1, "profile": True}],
        )
    if name == "cpu":
        return Suite(
            name, "cpu", threads or 2, "float32",
            matmul={"size": 2048, "dtype": "float32", "repeats": 5},
            step_groups=[
                _step_group("tiny", 3, 4, 2, 64, 1, 5, impls=CPU_IMPLS),
                # the default profile's batch shape; 7-15 s a step on 2 quiet cores: one warm-up, two timed steps
                _step_group("smollm2", 3, 4, 2, 32, 1, 2,
                            impls=CPU_IMPLS),
            ],
            # steady state, like every other step case: one-time packing and heap growth in the warm-up
            default_profile={"model": "smollm2", "warmup": 1, "steps": 2},
            loss_only=[{"model": "smollm2", "vocab": SMOLLM2_HEAD[0], "hidden": SMOLLM2_HEAD[1], "rows": 64,
                        "repeats": 10, "impls": ["chunked", "trl", "naive"]}],
            # hidden 256 on CPU keeps the 4096 x 152k case near a minute; memory is dominated by T x V
            kernel={"heads": [(49152, 256), (151936, 256)], "rows": [256, 1024, 4096],
                    "impls": ["chunked", "naive"], "repeats": 3, "chunk": 128, "naive_cap_gb": 8.0},
        )
    if name in ("gpu", "gpu2"):
        # issue 12's and 26's targets on one GPU, in two parts (a case process costs 25-60 s on an H200:
        # start-up, load, compile, warm-up; the device plan in benchmarks/README.md runs both in one command,
        # part 1 first). gpu: the whole step at 16 rollouts (>= 5x the 424 tok/s of 2026-11-30, scoring >= 1.5x
        # TRL), rollouts beside transformers' compiled static cache at that batch, and that step piece by piece
        # and profiled (where its time goes); gpu2: the step at 256 rollouts (>= 10x TRL), rollouts at 256, the
        # larger model, the loss alone and the loss kernel. The naive step is compared on CPU. One run of each
        # side: the device budget holds no second one.
        groups = [_step_group("smollm2", 1, 16, 8, 128, 1, 2, impls=("opsd", "trl"), role="step16"),
                  _step_group("smollm2", 1, 256, 32, 128, 1, 1, impls=("opsd", "trl"), role="step256")]
        if large_model:
            groups.append(_step_group(large_model, 1, 8, 4, 128, 1, 2, impls=("opsd", "trl"), role="large"))
        order = ("matmul", "steps:0", "sampling:0", "breakdown") if name == "gpu" else \
            ("matmul", "steps:1", "sampling:1", *(("steps:2",) if large_model else ()), "loss_only", "kernel")
        # the sampler `opsd train` runs on CUDA (with top_k 20, and with top_k 0: over the nucleus alone) beside
        # transformers' generate (TRL's path) and its compiled static cache (the target's baseline)
        sampling = {"model": "smollm2", "new_tokens": 128, "dtype": "bfloat16", "repeats": 2, "compile": True,
                    "paths": list(GPU_SAMPLING_PATHS)}
        suite = Suite(
            name, device or "cuda", threads or 8, "bfloat16",
            matmul={"size": 8192, "dtype": "bfloat16", "repeats": 10},
            step_groups=groups,
            default_profile=None,
            loss_only=[{"model": "smollm2", "vocab": SMOLLM2_HEAD[0], "hidden": SMOLLM2_HEAD[1],
                        "rows": 8 * 128, "repeats": 10, "impls": ["chunked", "trl", "naive"]}],
            # the 152k-vocabulary head only: the target's shape
            kernel={"heads": [(151936, 2048)], "rows": [1024, 4096, 8192],
                    "impls": ["chunked", "naive"], "repeats": 3, "chunk": 256, "naive_cap_gb": 40.0},
            sampling=[{**sampling, "batches": [16]}, {**sampling, "batches": [256]}],
            breakdown=[{**_step_group("smollm2", 1, 16, 8, 128, 1, 1), "impl": "opsd", "precision": "bfloat16",
                        "repeats": 1, "profile": True}],
            order=order,
        )
        return smoke_scaled(suite, threads) if smoke else suite
    raise ValueError(f"unknown suite {name!r} (quick, cpu, gpu, gpu2)")


def smoke_scaled(suite: Suite, threads: int | None = None) -> Suite:
    """The same cases at toy sizes (the rehearsal of the GPU run, ``benchmarks/gpu.sh --smoke``): every case of
    ``suite``, in its order, with its kind, implementation, model and role, but a few rollouts of 4 tokens, one
    warm-up and one timed step, one repeat, a 256² matmul, a narrow loss head with the 152k vocabulary kept.
    On a CPU the opsd cases sample with ``static``, the sampler ``opsd train`` takes on CUDA, and everything
    runs in fp32 (bf16 products are emulated on CPUs without bf16 units: 0.6 GFLOP/s at 256² on this one)."""
    cpu = suite.device == "cpu"
    precision = "float32" if cpu else suite.precision

    def group(g: dict[str, Any]) -> dict[str, Any]:
        rollouts = 2 if g["rollouts"] <= 16 else 4
        out = {**g, "rollouts": rollouts, "micro_batch": rollouts // 2, "new_tokens": 4, "warmup": 1, "steps": 1}
        return {**out, "sampler": "static"} if cpu else out

    kernel = suite.kernel and {**suite.kernel, "heads": [(v, 64) for v, _h in suite.kernel["heads"]],
                               "rows": [16, 32, 64], "repeats": 1, "chunk": 16}
    return Suite(
        suite.name, suite.device, threads or 1, precision,
        matmul={**suite.matmul, "size": 256, "repeats": 2, "dtype": precision},
        step_groups=[group(g) for g in suite.step_groups],
        default_profile=suite.default_profile,
        loss_only=[{**c, "rows": 16, "repeats": 2} for c in suite.loss_only],
        kernel=kernel,
        sampling=[{**s, "batches": [2 if b <= 16 else 4 for b in s["batches"]], "new_tokens": 4, "repeats": 1,
                   "dtype": precision} for s in suite.sampling],
        breakdown=[{**group(b), "repeats": 1, "precision": precision} for b in suite.breakdown],
        order=suite.order, smoke=True,
    )


def plan(suite: Suite) -> list[tuple[str, dict[str, Any]]]:
    """The ordered case runs: (kind, spec) pairs, section by section in ``suite.order``."""
    common = {"device": suite.device, "threads": suite.threads}
    runs: list[tuple[str, dict[str, Any]]] = []
    for section in suite.order:
        name, _, index = section.partition(":")
        if name == "matmul":
            runs.append(("matmul", {**common, **suite.matmul}))
        elif name == "steps":
            for gi in _pick(range(len(suite.step_groups)), index):
                runs += _group_runs(suite, gi, suite.step_groups[gi])
        elif name == "default" and suite.default_profile:
            runs.append(("step", {**common, **suite.default_profile, "impl": "opsd", "profile": "default",
                                  "precision": suite.precision, "group": "default", "repeat": 0}))
        elif name in ("sampling", "breakdown"):
            specs = suite.sampling if name == "sampling" else suite.breakdown
            runs += [(name, {**common, **specs[i], "group": name}) for i in _pick(range(len(specs)), index)]
        elif name == "loss_only":
            runs += _loss_only_runs(suite, common)
        elif name == "kernel" and suite.kernel:
            runs += _kernel_runs(suite, common)
    return runs


def _pick(indices: range, index: str) -> list[int]:
    return list(indices) if not index else [int(index)]


def _loss_only_runs(suite: Suite, common: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [("kernel", {**common, "impl": impl, "rows": case["rows"], "hidden": case["hidden"], "vocab": case["vocab"],
                        "repeats": case["repeats"], "chunk": 128, "warmup": 1, "naive_cap_gb": 1e9,
                        "group": f"loss_only:{case['model']}"})
            for case in suite.loss_only for impl in case["impls"]]


def _kernel_runs(suite: Suite, common: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    k = suite.kernel
    assert k is not None
    runs = []
    index = 0
    for vocab, hidden in k["heads"]:
        for rows in k["rows"]:
            order = k["impls"] if index % 2 == 0 else list(reversed(k["impls"]))
            index += 1
            for impl in order:
                runs.append(("kernel", {**common, "impl": impl, "rows": rows, "hidden": hidden, "vocab": vocab,
                                        "repeats": k["repeats"], "chunk": k["chunk"],
                                        "naive_cap_gb": k["naive_cap_gb"], "group": "kernel"}))
    return runs


def _group_runs(suite: Suite, gi: int, group: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    common = {"device": suite.device, "threads": suite.threads}
    runs = []
    for rep in range(group["repeats"]):
        order = group["impls"] if rep % 2 == 0 else list(reversed(group["impls"]))
        for impl in order:
            spec = {k: v for k, v in group.items() if k not in ("repeats", "impls")}
            runs.append(("step", {**common, **spec, "impl": impl, "precision": suite.precision,
                                  "group": gi, "repeat": rep}))
    return runs
