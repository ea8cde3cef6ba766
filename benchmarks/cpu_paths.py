"""The default profile's train stage under each CPU path, on this CPU and on the CPUs it can pretend to be.

``python -m benchmarks.cpu_paths [--steps 2] [--isa native,avx2] [--out FILE]``

Each row is one ``opsd train`` process (SmolLM2-135M, the default profile, ``--steps`` steps) with one
setting of ``train.packed_weights`` and ``opsd.sampling.dtype``, and ``auto`` for both: the check
that ``auto`` picks the fastest path the machine has, and that the fallback is never slower than plain
PyTorch (packs off, fp32). ``--isa avx2`` runs the same rows with ``OPSD_CPU_ISA=avx2``: torch, oneDNN
and MKL run their AVX2 kernels, as on an AVX2-only CPU (the memory system stays this machine's, so
the absolute times are this machine's, not an AVX2 machine's). Data is generated and prepared once,
untimed; the model cache is the project's own ``.opsd/models``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ROWS: list[tuple[str, list[str]]] = [
    ("auto (what the project runs)", []),
    ("packs on, fp32 sampling", ["train.packed_weights=auto", "opsd.sampling.dtype=float32"]),
    ("packs on, bf16 sampling", ["train.packed_weights=auto", "opsd.sampling.dtype=bfloat16"]),
    ("plain PyTorch, fp32 sampling", ["train.packed_weights=off", "opsd.sampling.dtype=float32"]),
    ("plain PyTorch, bf16 sampling", ["train.packed_weights=off", "opsd.sampling.dtype=bfloat16"]),
]


def _opsd(project: Path, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "opsd_core.cli", *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=3600)


def _project(tmp: Path, env: dict[str, str]) -> Path:
    text = (REPO / "params.yaml").read_text().replace("cache_dir: .opsd/models", f"cache_dir: {REPO / '.opsd/models'}", 1)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--isa", default="native,avx2", help="comma-separated: native and/or OPSD_CPU_ISA values")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    base = {k: v for k, v in os.environ.items() if k not in ("OPSD_CPU_ISA", "OPSD_HIDE")}
    base.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    results = []
    with tempfile.TemporaryDirectory(prefix="opsd-cpu-paths-") as tmp:
        project = _project(Path(tmp), base)
        for isa in args.isa.split(","):
            env = dict(base) if isa == "native" else {**base, "OPSD_CPU_ISA": isa}
            for name, sets in ROWS:
                row = run_row(project, isa, name, sets, args.steps, env)
                row["isa"] = isa
                results.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"default profile, SmolLM2-135M, {args.steps} steps per row; one process per row\n")
    print("| CPU | setting | chosen packs / sampling | train stage (s) | sampling tok/s | training tok/s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['isa']} | {r['row']} | error: {r['error']} | | | |")
            continue
        print(f"| {r['isa']} ({r['torch_cpu']}) | {r['row']} | {r['packs']} / {r['sampling_dtype']} | "
              f"{r['stage_s']:.1f} | {r['sampling_tok_s']:.1f} | {r['training_tok_s']:.1f} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
