"""The default profile's train stage under each CPU path, on this CPU and on the CPUs it can pretend to be.

``python -m benchmarks.cpu_paths [--steps 2] [--repeats 3] [--isa native,avx2] [--profile default] [--out FILE]``

Each row is one setting of ``train.packed_weights`` and ``opsd.sampling.dtype``, timed as ``opsd train``
processes (SmolLM2-135M, the default profile, ``--steps`` steps), ``--repeats`` times with the rows in
a rotated order (a process started first pays for the page cache), medians shown; the row ``auto``
resolves to on this CPU (``opsd env --json``) is marked: the check that ``auto`` picks the fastest path
the machine has, and that the fallback is never slower than plain PyTorch (packs off, fp32). Compare
tokens/s: fp32 and bf16 sampling draw different rollouts, so their lengths, and the stage's wall time,
differ. ``--isa avx2`` runs the same rows with ``OPSD_CPU_ISA=avx2``: torch, oneDNN
and MKL run their AVX2 kernels, as on an AVX2-only CPU (the memory system stays this machine's, so
the absolute times are this machine's, not an AVX2 machine's). Data is generated and prepared once,
untimed; the model cache is the project's own ``.opsd/models``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from opsd_core.offline import OFFLINE_DEFAULTS

REPO = Path(__file__).resolve().parents[1]
ROWS: list[tuple[str, list[str]]] = [
    ("packs on, fp32 sampling", ["train.packed_weights=auto", "opsd.sampling.dtype=float32"]),
    ("packs on, bf16 sampling", ["train.packed_weights=auto", "opsd.sampling.dtype=bfloat16"]),
    ("plain PyTorch, fp32 sampling", ["train.packed_weights=off", "opsd.sampling.dtype=float32"]),
    ("plain PyTorch, bf16 sampling", ["train.packed_weights=off", "opsd.sampling.dtype=bfloat16"]),
]


def _opsd(project: Path, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=3600)


def _project(tmp: Path, env: dict[str, str], profile: str, cache: Path) -> Path:
    text = (REPO / "params.yaml").read_text().replace("cache_dir: .opsd/models", f"cache_dir: {cache}", 1)
    text = text.replace("profile: default", f"profile: {profile}", 1)
    (tmp / "params.yaml").write_text(text)
    for args in (["data", "generate"], ["prepare"]):
        done = _opsd(tmp, args, env)
        if done.returncode:
            raise SystemExit(f"opsd {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return tmp


def run_row(project: Path, tag: str, name: str, sets: list[str], steps: int, env: dict[str, str]) -> dict[str, Any]:
    out = project / "runs" / f"{tag}-{''.join(c if c.isalnum() else '_' for c in name)}"
    args = ["train", f"--set=train.steps={steps}"] + [f"--set={s}" for s in sets]
    args += [f"--set=train.{k}={out / k}" for k in ("checkpoint_dir", "output_dir", "reports_dir")]
    start = time.perf_counter()
    done = _opsd(project, args, env)
    wall = time.perf_counter() - start
    if done.returncode:
        return {"row": name, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    summary = json.loads((out / "reports_dir" / "train.json").read_text())
    run = summary["execution"]
    return {"row": name, "process_s": wall, "stage_s": summary["wall_s"],
            "sampling_tok_s": summary["sampling_tokens_per_s"], "training_tok_s": summary["training_tokens_per_s"],
            "packs": run["packs"], "sampling_dtype": run["sampling_dtype"], "torch_cpu": summary["machine"]["torch_cpu"]}


def auto_choice(project: Path, env: dict[str, str]) -> str:
    """The row ``auto`` resolves to under ``env``."""
    done = _opsd(project, ["env", "--json"], env)
    run = json.loads(done.stdout)["execution"]
    packs = "plain PyTorch" if run["packs"] == "off" else "packs on"
    return f"{packs}, {'bf16' if run['sampling_dtype'] == 'bfloat16' else 'fp32'} sampling"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", default="default", help="params.yaml profile (smoke: the tiny model, for tests)")
    parser.add_argument("--model-cache", type=Path, default=REPO / ".opsd/models", help="model.cache_dir")
    parser.add_argument("--isa", default="native,avx2", help="comma-separated: native and/or OPSD_CPU_ISA values")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    # native means native: no simulation, nor the library caps a simulating parent process set
    base = {k: v for k, v in os.environ.items()
            if k not in ("OPSD_CPU_ISA", "OPSD_HIDE", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                         "MKL_ENABLE_INSTRUCTIONS")}
    base.update(OFFLINE_DEFAULTS)
    results = []
    with tempfile.TemporaryDirectory(prefix="opsd-cpu-paths-") as tmp:
        project = _project(Path(tmp), base, args.profile, args.model_cache)
        for isa in args.isa.split(","):
            env = dict(base) if isa == "native" else {**base, "OPSD_CPU_ISA": isa}
            auto = auto_choice(project, env)
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in ROWS}
            for rep in range(args.repeats):
                for name, sets in ROWS[rep % len(ROWS):] + ROWS[:rep % len(ROWS)]:
                    row = run_row(project, f"{isa}-{rep}", name, sets, args.steps, env)
                    print(json.dumps({"isa": isa, "repeat": rep, **row}), file=sys.stderr, flush=True)
                    runs[name].append(row)
            for name, _ in ROWS:
                ok = [r for r in runs[name] if "error" not in r]
                entry: dict[str, Any] = {"isa": isa, "row": name, "auto": name == auto, "runs": runs[name]}
                if ok:
                    entry.update({k: statistics.median([r[k] for r in ok]) for k in ("stage_s", "sampling_tok_s", "training_tok_s")})
                    entry["torch_cpu"] = ok[0]["torch_cpu"]
                else:
                    entry["error"] = runs[name][0]["error"]
                results.append(entry)
    print(f"{args.profile} profile, {args.steps} steps per process; medians of {args.repeats} processes "
          "(rows rotated); ** = what auto picks here\n")
    print("| CPU | setting | train stage (s) | sampling tok/s | training tok/s |")
    print("|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['isa']} | {r['row']} | error: {r['error']} | | |")
            continue
        mark = "**" if r["auto"] else ""
        print(f"| {r['isa']} ({r['torch_cpu']}) | {mark}{r['row']}{mark} | {r['stage_s']:.1f} | "
              f"{r['sampling_tok_s']:.1f} | {r['training_tok_s']:.1f} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
