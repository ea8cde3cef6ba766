"""Where a training step spends its time: one step case under cProfile, in this process.

``python -m benchmarks.profile_step --impl opsd --model smollm2 [--rollouts 2 --micro-batch 1 --new-tokens 32]``
prints the step's phase times, then the functions with the largest cumulative time and, for each,
its share of the timed steps. cProfile adds a per-call cost, so Python-heavy code (the decode loop)
looks somewhat slower than it is; compare shares between implementations, not absolute times.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import re

from benchmarks.common import add_step_arguments, start_step_case


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(parser, ["opsd", "opsd_bf16s", "opsd_fast", "trl", "naive"], "opsd", 2, 1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--match", default=None, help="only list functions whose description matches this regex")
    args = parser.parse_args(argv)
    spec = start_step_case(args, args.warmup, args.steps)
    from benchmarks.case import run_step

    profiler = cProfile.Profile()
    profiler.enable()
    result = run_step(spec)
    profiler.disable()
    timed = sum(s["step_s"] for s in result["steps"]) + sum(s["step_s"] for s in result["warmup_steps"])
    for row in result["warmup_steps"] + result["steps"]:
        print({k: round(v, 3) for k, v in row.items() if k in ("step_s", "sample_s", "score_s", "opt_s")})
    buffer = io.StringIO()
    stats = pstats.Stats(profiler, stream=buffer).sort_stats("cumulative")
    stats.print_stats(*([args.match, args.top] if args.match else [args.top]))
    print(f"all steps (warm-up included): {timed:.2f} s; share = cumtime / that")
    for line in buffer.getvalue().splitlines():
        fields = line.split()
        if len(fields) >= 6 and re.match(r"^[\d/]+$", fields[0]):
            try:
                share = float(fields[3]) / timed
            except ValueError:
                continue
            print(f"{share:7.1%}  {line}")
        elif line.strip():
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
