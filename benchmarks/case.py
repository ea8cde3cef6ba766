"""One benchmark case in its own process: ``python -m benchmarks.case KIND --spec JSON --json OUT``.

Kinds: ``matmul`` (the machine's dense matmul limit), ``step`` (a training step: impl opsd | trl |
naive), ``kernel`` (the loss alone: impl chunked | naive | trl), ``sampling`` (rollouts alone, opsd's paths
beside transformers' ``generate``: ``benchmarks.static_generate``), ``breakdown`` (an opsd step piece by
piece, optionally under torch.profiler: ``benchmarks.breakdown``). The process sets its thread count
before doing anything else and writes one JSON object; the parent never imports torch for a case.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.common import OFFLINE_ENV, machine_info, process_peak_rss_mb, set_threads
from opsd_core.backends.capabilities import CapabilityError


def run_matmul(spec: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.flops import measure_matmul

    return measure_matmul(spec["size"], spec["dtype"], spec["device"], spec.get("repeats", 5))


def run_step(spec: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.flops import model_shape, step_flops
    from benchmarks.recorder import StepRecorder

    impl = spec["impl"]
    if impl in ("opsd", "opsd_bf16s", "opsd_fast"):
        from benchmarks.step_opsd import run_opsd as runner
    elif impl == "naive":
        from benchmarks.step_opsd import run_naive as runner
    elif impl in ("trl", "trl_bf16"):
        from benchmarks.step_trl import run_trl as runner
    else:
        raise ValueError(f"unknown step implementation {impl!r} (opsd, opsd_bf16s, opsd_fast, trl, trl_bf16, naive)")
    rec = StepRecorder(spec["device"])
    with tempfile.TemporaryDirectory(prefix="opsd-bench-") as tmp:
        info = runner(spec, rec, Path(tmp))
    shape = model_shape(info["model"])
    timed = rec.steps[spec["warmup"]:]
    if len(rec.steps) != spec["warmup"] + spec["steps"]:
        raise RuntimeError(f"{impl}: recorded {len(rec.steps)} steps, expected {spec['warmup'] + spec['steps']}")
    for row in timed:
        flops = step_flops(shape, [tuple(s) for s in row["sequences"]])
        row["flops"] = flops["total"]
        row["flops_by_part"] = flops
        row["tok_s"] = row["tokens"] / row["step_s"]
        row["sample_tok_s"] = row["tokens"] / row["sample_s"] if row["sample_s"] else None
        row["score_tok_s"] = row["tokens"] / row["score_s"] if row["score_s"] else None
        row["flops_per_s"] = row["flops"] / row["step_s"]
    params = info["params"]
    return {
        "impl": impl,
        "model_shape": shape.to_dict(),
        "steps": timed,
        "warmup_steps": rec.steps[:spec["warmup"]],
        "settings": {
            "rollouts_per_step": params.train.rollouts_per_step,
            "micro_batch_size": params.train.micro_batch_size,
            "max_new_tokens": params.opsd.sampling.max_new_tokens,
            "lora": params.lora.model_dump(),
            "loss": {"divergence": params.opsd.divergence, "support": params.opsd.support,
                     "clip": params.opsd.clip, "chunk_size": params.opsd.chunk_size},
            "precision": params.train.precision,
            "sampling_dtype": params.opsd.sampling.dtype,
            "frozen_dtype": params.train.frozen_dtype,
            "autocast": info.get("autocast"),  # TRL: "phase:state" pairs its first decoder layer ran under
        },
        "per_phase_memory": rec.mem.per_phase,
        "train_wall_s": info.get("train_wall_s"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["matmul", "step", "kernel", "sampling", "breakdown"])
    parser.add_argument("--spec", required=True, help="JSON object with the case's settings")
    parser.add_argument("--json", required=True, type=Path, help="where to write the result")
    args = parser.parse_args(argv)
    spec = json.loads(args.spec)
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    threads = int(spec.get("threads", 2))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    set_threads(threads)
    start = time.perf_counter()
    result: dict[str, Any] = {"kind": args.kind, "spec": spec, "ok": True}
    try:
        if args.kind == "matmul":
            result["result"] = run_matmul(spec)
        elif args.kind == "step":
            result["result"] = run_step(spec)
        elif args.kind == "sampling":
            from benchmarks.static_generate import measure as measure_sampling

            result["result"] = measure_sampling(spec)
        elif args.kind == "breakdown":
            from benchmarks.breakdown import measure as measure_breakdown

            result["result"] = measure_breakdown(spec)
        else:
            from benchmarks.kernel import run_kernel

            result["result"] = run_kernel(spec)
    except CapabilityError as err:  # a path this machine does not have: not a failure of the code
        result.update(ok=False, skipped=True, error=f"not on this machine: {err}")
    except Exception as err:  # the parent records the failure and goes on with the other cases
        result.update(ok=False, error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
    import torch

    result["threads"] = torch.get_num_threads()
    result["machine"] = machine_info(spec.get("device", "cpu"))
    result["process_peak_rss_mb"] = process_peak_rss_mb()
    result["wall_s"] = time.perf_counter() - start
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    if not result["ok"]:
        print(result.get("traceback") or result["error"], file=sys.stderr)
    return 0 if result["ok"] or result.get("skipped") else 1


if __name__ == "__main__":
    sys.exit(main())
