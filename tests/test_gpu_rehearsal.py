"""The GPU run rehearsed on a CPU (issue 26): ``benchmarks/gpu.sh --device cpu --smoke --part all``, the script
the device plan runs on the GPU box, with both parts' case list at toy sizes, from shape-only models as on the
box (here the tiny model's shape), into its own results folder.

Nothing here reads a timing: what is checked is that every case of both parts ran (none failed, none cut by the
time guards), in the GPU suites' order with their kinds, implementations and roles, that both reports and the
targets check were written with the GPU targets' rows, and that the bf16 sampler's CUDA tests were called (and
skipped: no GPU here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import shape_model
from benchmarks.suites import build_suite, plan
from opsd_core.config import load_params
from opsd_core.models.sources import resolve_base_dir

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # bash and some twenty benchmark processes


def _case_list(cases: list[tuple[str, dict]]) -> list[tuple[object, ...]]:
    """What a case is, whatever its size: kind, implementation, group (step groups: their role), impl order."""
    return [(kind, spec.get("impl"), spec.get("role") or str(spec.get("group"))) for kind, spec in cases]


def test_the_gpu_run_rehearses_every_case_of_both_parts_on_a_cpu(tmp_path: Path) -> None:
    params = load_params(REPO / "params.yaml", "smoke", [f"model.cache_dir={tmp_path / 'models'}"])
    tiny = Path(resolve_base_dir(params.model, REPO))
    for name in ("smollm2-135m-shape", "smollm2-1.7b-shape"):  # what `gpu.sh --prepare` makes, here tiny
        shape_model.export(tiny, tmp_path / "shapes" / name)
    env = {**{k: v for k, v in os.environ.items() if k not in ("OPSD_BENCH_SMOLLM2", "OPSD_BENCH_LARGE_MODEL", "OUT")},
           "PYTHON": sys.executable, "OPSD_BENCH_SHAPES": str(tmp_path / "shapes"),
           "OPSD_BENCH_MODEL_CACHE": str(tmp_path / "models"), "OPSD_BENCH_PROBLEMS": str(tmp_path / "problems"),
           "OPSD_BENCH_RESULTS": str(tmp_path / "results"), "HF_HUB_CACHE": str(tmp_path / "hub")}
    proc = subprocess.run(["bash", "benchmarks/gpu.sh", "--device", "cpu", "--smoke", "--part", "all"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the weights were written beside the model cache, never into the shapes that travel to the box
    assert not [p for p in (tmp_path / "shapes").rglob("*") if p.name.endswith(shape_model.WEIGHT_SUFFIXES)]

    results = tmp_path / "results"
    (log,) = results.glob("*-bf16-sampler-cpu-tests.txt")
    assert "3 skipped" in log.read_text() and "no GPU" in log.read_text()
    (part2,) = results.glob("*-part2-smoke-cpu.json")
    (part1,) = [p for p in results.glob("*-smoke-cpu.json") if p != part2]
    reports = {"gpu": json.loads(part1.read_text()), "gpu2": json.loads(part2.read_text())}
    assert part1 != part2 and part1.with_suffix(".md").is_file() and part2.with_suffix(".md").is_file()

    for suite, report in reports.items():
        assert report["suite"] == suite and report["smoke"] and report["device"] == "cpu"
        assert report["failures"] == [], report["failures"]  # every case ran; none was cut by a time guard
        real = build_suite(suite, large_model="larger-model-dir")  # the GPU run's own case list, full size
        ran = [(c["kind"], c["spec"]) for c in report["cases"]]
        assert _case_list(ran) == _case_list(plan(real)), suite
        # at toy sizes: a few rollouts of 4 tokens, on the CPU
        assert all(spec["device"] == "cpu" and spec.get("new_tokens", 4) == 4 for _kind, spec in ran)
        assert all(spec.get("sampler") == "static" for kind, spec in ran if kind == "step" and spec["impl"] == "opsd")

    targets = {t["target"] for report in reports.values() for t in report["targets"]}
    for label in ("opsd static sampler (row noise) >= 1.0x transformers' compiled static cache (batch 2)",
                  "opsd static sampler (row noise) >= 1.0x transformers' compiled static cache (batch 4)",
                  "opsd whole step >= 2120 tok/s at 16 rollouts (5x 2026-11-30's 424)",
                  "opsd whole step >= 10x TRL at 256 rollouts",
                  "opsd scoring tok/s >= 1.5x TRL (smollm2, R=2)", "opsd scoring tok/s >= 1.5x TRL (smollm2, R=4)"):
        assert label in targets, (label, targets)
    paths = {path for report in reports.values() for batch in report["sampling"].values() for path in batch}
    assert paths == {"opsd static sampler (row noise)", "opsd static sampler, top_k 0 (nucleus)",
                     "generate, dynamic cache", "generate, static cache, compiled"}, paths
    (breakdown,) = reports["gpu"]["breakdown"]
    assert breakdown["profile"]["wall_s"] > 0 and breakdown["profile"]["top"]
    large = [c["spec"]["model"] for c in reports["gpu2"]["cases"] if c["spec"].get("role") == "large"]
    assert large and all(m.endswith("smollm2-1.7b-shape-2l") for m in large), large
    assert "Smoke rehearsal on cpu" in part2.with_suffix(".md").read_text()
