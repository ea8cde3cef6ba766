"""Write the benchmark problems to their cache: ``python -m benchmarks.problems N [N ...] [--seed S]``.

Run where reasoning-gym is installed, then copy ``.opsd/bench/problems`` to a machine without it (the GPU
script's device); every case reads the same problems from there.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks.common import PROBLEM_CACHE, trace_problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("counts", type=int, nargs="+", help="problem counts (rollouts per step x steps of a case)")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    for n in args.counts:
        problems = trace_problems(n, args.seed)
        print(f"{len(problems)} problems, seed {args.seed}: {PROBLEM_CACHE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
