"""How long the small commands take in a project (issue 16 asks under 2 s each): ``opsd status``,
``opsd --help`` and a refusal (``opsd promote`` without ``--rollback``), each run as a user runs it, in its
own process, ``--repeats`` times in turn; prints the fastest and the median wall time of each.

    python -m benchmarks.cli_latency --project DIR [--repeats 5]

DIR: a project that has run its pipeline (e.g. a clone after ``opsd run``), so that status reads a real
registry. On a shared machine, compare runs taken back to back: the fastest time moves least with load.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS: dict[str, list[str]] = {
    "opsd status": ["status"],
    "opsd --help": ["--help"],
    "opsd promote (refused)": ["promote"],
}


def opsd_command() -> list[str]:
    """The installed ``opsd`` script beside this interpreter (what a user runs), else the module."""
    script = Path(sys.executable).parent / "opsd"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "flows.cli"]


def measure(project: Path, repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(repeats):
        for name, args in COMMANDS.items():  # in turn: drift of the machine's load hits every command alike
            started = time.perf_counter()
            subprocess.run([*opsd_command(), *args], cwd=project, capture_output=True, check=False, timeout=300)
            times[name].append(time.perf_counter() - started)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=Path.cwd(), help="a project that has run its pipeline")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if not (args.project / "params.yaml").is_file():
        parser.error(f"{args.project} has no params.yaml")
    for name, values in measure(args.project.resolve(), args.repeats).items():
        print(f"{name:<24} fastest {min(values):.2f} s  median {statistics.median(values):.2f} s  "
              f"({len(values)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
