"""Run a benchmark suite: ``python -m benchmarks.run --suite cpu|gpu|gpu2|quick``.

Every case is a separate ``python -m benchmarks.case`` process (peak memory per case, no state shared
between implementations), run one after the other in the suite's alternating order. Results go to
``<out-dir>/<YYYY-MM-DD>-<tag>.json`` and ``.md``; the raw result of every case is kept in the JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, case_env
from benchmarks.report import aggregate, markdown
from benchmarks.suites import build_suite, plan

RESULTS = Path(__file__).resolve().parent / "results"


def machine_tag(results: list[dict[str, Any]]) -> str:
    """Hostname, plus the GPU's name when the cases ran on one (read from the cases: the parent stays off CUDA)."""
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "-", platform.node() or "machine").strip("-") or "machine"
    gpu = next((r["machine"].get("gpu") for r in results if r.get("machine", {}).get("gpu")), None)
    if gpu:
        tag += "-" + re.sub(r"[^A-Za-z0-9]+", "", gpu)[:24]
    return tag


def run_case(kind: str, spec: dict[str, Any], workdir: Path, index: int, timeout_s: float) -> dict[str, Any]:
    out = workdir / f"{index:03d}-{kind}-{spec.get('impl', kind)}.json"
    cmd = [sys.executable, "-m", "benchmarks.case", kind, "--spec", json.dumps(spec), "--json", str(out)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=case_env(int(spec.get("threads", 2))), capture_output=True,
                              text=True, timeout=timeout_s)
        rc, tail = proc.returncode, (proc.stderr or "")[-2000:]
    except subprocess.TimeoutExpired:
        rc, tail = -1, f"timed out after {timeout_s:.0f} s"
    wall = time.perf_counter() - start
    if out.is_file():
        result = json.loads(out.read_text())
    else:
        result = {"kind": kind, "spec": spec, "ok": False, "error": f"no result (exit {rc}): {tail[-500:]}"}
    result["process_wall_s"] = wall
    if not result.get("ok"):
        result.setdefault("stderr_tail", tail)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="opsd benchmarks: OPSD vs TRL SDFTTrainer vs naive")
    parser.add_argument("--suite", choices=["quick", "cpu", "gpu", "gpu2"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in every case (default: suite)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--tag", default=None, help="machine tag in the file name (default: hostname)")
    parser.add_argument("--large-model", default=None, help="gpu suite: a local 1-2B model directory")
    parser.add_argument("--device", default=None, help="run the suite's cases there (gpu suites on cpu: the rehearsal)")
    parser.add_argument("--smoke", action="store_true",
                        help="gpu suites: every case at toy sizes (the rehearsal of the GPU run; numbers mean nothing)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting new cases after this many seconds (the rest are marked skipped)")
    parser.add_argument("--case-timeout-s", type=float, default=1800)
    parser.add_argument("--hard-limit-s", type=float, default=None,
                        help="stop a running case so that the whole run ends by then (the report is still written)")
    parser.add_argument("--fail-fast", action="store_true",
                        help="after a failed case, skip the rest (a short device lease is not spent on a broken setup)")
    parser.add_argument("--only", default=None,
                        help="run only cases whose kind, group or model contains this text (a,b: either)")
    args = parser.parse_args(argv)

    suite = build_suite(args.suite, args.threads, args.large_model, args.device, args.smoke)
    runs = plan(suite)
    if args.only:
        wanted = args.only.split(",")
        runs = [(k, s) for k, s in runs
                if any(w in str(v) for w in wanted for v in (k, s.get("group", ""), s.get("model", "")))]
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="opsd-bench-") as tmp:
        for i, (kind, spec) in enumerate(runs):
            elapsed = time.perf_counter() - started
            label = f"[{i + 1}/{len(runs)}] {kind} {spec.get('impl', '')} {spec.get('model', '')}".rstrip()
            failed = args.fail_fast and any(not r.get("ok") and not r.get("skipped") for r in results)
            if failed or (args.budget_s is not None and elapsed > args.budget_s):
                why = "an earlier case failed (--fail-fast)" if failed else f"time budget {args.budget_s:.0f} s spent"
                results.append({"kind": kind, "spec": spec, "ok": False, "skipped": True, "error": why})
                print(f"{label}: skipped ({why})", file=sys.stderr)
                continue
            timeout = args.case_timeout_s
            if args.hard_limit_s is not None:
                timeout = min(timeout, max(args.hard_limit_s - elapsed, 1.0))
            result = run_case(kind, spec, Path(tmp), i, timeout)
            results.append(result)
            status = "ok" if result.get("ok") else f"FAILED: {result.get('error')}\n{result.get('stderr_tail', '')}"
            print(f"{label} {_case_note(spec)}: {status} ({result['process_wall_s']:.1f} s)", file=sys.stderr)
    total = time.perf_counter() - started
    report = aggregate(suite, results)
    report["suite"] = suite.name
    report["total_wall_s"] = total
    report["date"] = dt.date.today().isoformat()
    report["argv"] = sys.argv[1:] if argv is None else argv
    # the GPU suite's second part beside the first, not over it
    tag = args.tag or (machine_tag(results) + ("-part2" if suite.name == "gpu2" else "")
                       + (f"-smoke-{suite.device}" if suite.smoke else ""))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"{report['date']}-{tag}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    text = markdown(report)
    stem.with_suffix(".md").write_text(text)
    print(text)
    print(f"written: {stem}.json, {stem}.md ({total:.0f} s)", file=sys.stderr)
    return 0 if all(r.get("ok") or r.get("skipped") for r in results) else 1


def _case_note(spec: dict[str, Any]) -> str:
    if "rows" in spec:
        return f"T={spec['rows']} V={spec['vocab']} H={spec['hidden']}"
    if "repeat" in spec:
        return f"repeat {spec['repeat']}"
    return ""


if __name__ == "__main__":
    sys.exit(main())
