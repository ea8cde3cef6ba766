"""Write the benchmark problems to their cache: ``python -m benchmarks.problems [N ...] [--suite S] [--seed S]``.

Run where reasoning-gym is installed, then copy ``.opsd/bench/problems`` to a machine without it (the GPU
script's box); every case reads the same problems from there. ``--suite`` writes what that suite's step
and breakdown cases read (rollouts per step × steps, per step group, a larger model's included).
"""

from __future__ import annotations

import argparse
import sys

from benchmarks.common import PROBLEM_CACHE, trace_problems
from benchmarks.suites import build_suite


def suite_counts(name: str, smoke: bool = False) -> list[int]:
    """The problem counts the step cases of suite ``name`` read (at its smoke sizes: ``smoke``)."""
    suite = build_suite(name, large_model="any-large-model", smoke=smoke)
    return sorted({g["rollouts"] * (g["warmup"] + g["steps"]) for g in [*suite.step_groups, *suite.breakdown]})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("counts", type=int, nargs="*", help="problem counts (rollouts per step x steps of a case)")
    parser.add_argument("--suite", choices=["quick", "cpu", "gpu", "gpu2"], default=None)
    parser.add_argument("--smoke", action="store_true", help="also the counts of the suite's smoke sizes")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    counts = sorted(set(args.counts) | set(suite_counts(args.suite) if args.suite else [])
                    | set(suite_counts(args.suite, smoke=True) if args.suite and args.smoke else []))
    if not counts:
        parser.error("give problem counts or --suite")
    for n in counts:
        problems = trace_problems(n, args.seed)
        print(f"{len(problems)} problems, seed {args.seed}: {PROBLEM_CACHE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
