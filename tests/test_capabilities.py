"""The probe on this machine and on the machines it pretends to be, and whole runs on those machines.

``OPSD_CPU_ISA=avx2`` makes torch, oneDNN and MKL run their AVX2 kernels (so oneDNN really refuses bf16
weights, as on an AVX2-only CPU) and ``OPSD_HIDE`` reports capabilities missing: the paths CI's own CPU
lacks run in every CI, in fresh processes (the libraries read their caps once per process).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opsd_core.backends.capabilities import (
    ISA_CAPS,
    X86_FLAGS,
    CapabilityError,
    hidden,
    isa_cap,
    measure_pack_speedup,
    probe,
)
from tests.support import cli_project, opsd

ROOT = Path(__file__).resolve().parents[1]
X86 = platform.machine().lower() in ("x86_64", "amd64")
x86_only = pytest.mark.skipif(not X86, reason="OPSD_CPU_ISA caps x86 instruction sets; "
                                              "non-x86 runs are covered by the OPSD_HIDE tests")
pytestmark = pytest.mark.slow  # `opsd` CLI subprocesses on simulated CPUs: out of the fast lane (make test-fast)

_PROBE = """
import json, torch
from opsd_core.backends.capabilities import apply_isa_cap, probe
apply_isa_cap()  # a process start, as the opsd command's (importing opsd applies nothing)
caps = probe().as_dict()
try:
    torch.ops.mkldnn._reorder_linear_weight(torch.randn(64, 64).bfloat16())
    caps["raw_bf16_reorder"] = True
except RuntimeError as err:
    caps["raw_bf16_reorder"] = str(err)
print(json.dumps(caps))
"""


def _probe_in(env: dict[str, str]) -> dict:
    # a fresh machine: no simulation inherited from this process (nor the library caps it set)
    clean = {k: v for k, v in os.environ.items() if k not in ("OPSD_CPU_ISA", "OPSD_HIDE", *ISA_CAPS["avx2"])}
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env={**clean, **env}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_probe_is_consistent_on_this_machine() -> None:
    caps = probe()
    assert probe() is caps  # probed once per process
    assert caps.onednn_fp32 or not caps.onednn_bf16
    if caps.x86:
        assert set(caps.flags) <= set(X86_FLAGS)
        assert caps.bf16_units == any(f in caps.flags for f in ("avx512_bf16", "amx_bf16"))
        assert caps.torch_cpu in ("DEFAULT", "AVX2", "AVX512", "ZVECTOR")
    assert caps.cuda_bf16 <= caps.cuda
    json.dumps(caps.as_dict())


@x86_only
def test_an_avx2_cpu_is_simulated_down_to_the_libraries() -> None:
    caps = _probe_in({"OPSD_CPU_ISA": "avx2"})
    assert caps["torch_cpu"] == "AVX2" and caps["isa_cap"] == "avx2"
    assert not any(f.startswith(("avx512", "amx")) for f in caps["flags"])
    assert caps["onednn_fp32"] and not caps["onednn_bf16"] and not caps["bf16_units"]
    # oneDNN itself refuses, with the error the AVX2 machine gave: the cap is real, not only reported
    assert "bf16 path needs the cpu support" in caps["raw_bf16_reorder"]


@x86_only
def test_an_avx512_cpu_without_bf16_units_is_simulated() -> None:
    caps = _probe_in({"OPSD_CPU_ISA": "avx512"})
    assert not caps["bf16_units"] and "avx512_bf16" not in caps["flags"]
    real = probe()
    if all(f in real.flags for f in ("avx512bw", "avx512vl", "avx512dq")):
        assert caps["torch_cpu"] == "AVX512" and caps["onednn_bf16"] and caps["raw_bf16_reorder"] is True


def test_hidden_capabilities_are_reported_missing() -> None:
    caps = _probe_in({"OPSD_HIDE": "onednn,bf16,mallopt,cuda,mps"})
    assert caps["hidden"] == ["bf16", "cuda", "mallopt", "mps", "onednn"]
    assert not any(caps[k] for k in ("onednn_fp32", "onednn_bf16", "bf16_units", "mallopt", "cuda", "mps"))


def test_bad_simulation_variables_name_the_valid_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPSD_CPU_ISA", "avx9")
    with pytest.raises(CapabilityError, match="OPSD_CPU_ISA='avx9': use one of avx2, avx512"):
        isa_cap()
    monkeypatch.setenv("OPSD_HIDE", "onednn,gpu")
    with pytest.raises(CapabilityError, match="unknown capability gpu .*onednn, bf16, mallopt, cuda, mps"):
        hidden()


@pytest.mark.skipif(not probe().onednn_fp32, reason="no oneDNN packed linear to time")
def test_the_pack_probe_measures_a_ratio() -> None:
    ratio = measure_pack_speedup(rows=(4,), size=128, repeats=5)
    assert 0.05 < ratio < 50


# -- whole runs on the simulated machines --------------------------------------------------------------
@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = cli_project(tmp_path_factory.mktemp("project"), tmp_path_factory.mktemp("models"))
    opsd(project, "data", "generate")
    opsd(project, "prepare")
    return project


def _train(project: Path, name: str, env: dict[str, str], *sets: str) -> dict:
    args = [f"--set=train.{k}={project / name / k}" for k in ("checkpoint_dir", "output_dir", "reports_dir")]
    opsd(project, "train", "--set=train.steps=2", *args, *(f"--set={s}" for s in sets), env=env)
    return json.loads((project / name / "reports_dir" / "train.json").read_text())


@x86_only
def test_training_on_a_simulated_avx2_cpu_takes_the_fp32_paths(project: Path) -> None:
    """The crash the issue reported (bf16 packs on an AVX2 CPU) cannot happen: auto samples in fp32 over
    fp32 packs, and the record says so, in train.json."""
    summary = _train(project, "avx2", {"OPSD_CPU_ISA": "avx2"}, "train.packed_weights=on")
    run = summary["execution"]
    assert summary["machine"]["torch_cpu"] == "AVX2" and summary["machine"]["isa_cap"] == "avx2"
    assert (run["sampling_dtype"], run["packs"], run["pack_dtypes"]) == ("float32", "all", ["float32"])
    assert run["sampler"] == "opsd engine on a merged float32 copy" and summary["final_loss"] is not None
    assert summary["versions"]["torch"].startswith("2.")


def test_training_without_onednn_or_glibc_takes_plain_torch(project: Path) -> None:
    """What an arm64 Mac gets: no oneDNN packs, no allocator tuning, and the run still trains."""
    summary = _train(project, "plain", {"OPSD_HIDE": "onednn,mallopt,bf16"})
    run = summary["execution"]
    assert (run["packs"], run["allocator"], run["sampling_dtype"]) == ("off", "default", "float32")
    assert run["student_pass"].startswith("peft forward") and summary["final_loss"] is not None


@x86_only
def test_an_impossible_explicit_setting_fails_in_one_line_before_any_work(project: Path) -> None:
    start = time.perf_counter()
    proc = opsd(project, "train", "--set=train.frozen_dtype=bfloat16", "--set=train.checkpoint_dir=never",
                env={"OPSD_CPU_ISA": "avx2"}, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.frozen_dtype=bfloat16 needs oneDNN bf16 packs" in lines[0], proc.stderr
    assert "AVX2" in lines[0] and not (project / "never").exists()
    assert time.perf_counter() - start < 60


def test_opsd_env_prints_the_machine_the_paths_and_the_versions(project: Path) -> None:
    text = opsd(project, "env").stdout
    for needle in ("torch CPU capability", "oneDNN packs", "sampling", "student pass", "allocator", "torch 2."):
        assert needle in text, text
    record = json.loads(opsd(project, "env", "--json", env={"OPSD_HIDE": "onednn"}).stdout)
    assert record["machine"]["hidden"] == ["onednn"] and record["execution"]["packs"] == "off"
    assert record["versions"]["transformers"]
    proc = opsd(project, "env", "--set=train.packed_weights=on", env={"OPSD_HIDE": "onednn"}, check=False)
    assert proc.returncode == 2 and "error: train.packed_weights=on needs oneDNN" in proc.stdout


def test_opsd_run_refuses_an_impossible_setting_before_the_flow_starts(tmp_path: Path) -> None:
    """Written bare, as YAML users write it (``on`` is a boolean to YAML), on a machine without oneDNN."""
    project = cli_project(tmp_path / "clone", tmp_path / "models")
    text = (project / "params.yaml").read_text().replace("packed_weights: auto", "packed_weights: on", 1)
    (project / "params.yaml").write_text(text)
    proc = opsd(project, "run", env={"OPSD_HIDE": "onednn"}, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and "train.packed_weights=on needs oneDNN" in proc.stderr
    assert not (project / "data").exists() and not (project / ".opsd").exists()  # nothing bootstrapped
