"""The execution plan's rules on every kind of machine, from capabilities written down (no probing:
tests/support.py holds the machines).

Each machine here is one users have: an AVX2-only x86 VM or laptop, a Skylake-class AVX-512 server
without bf16 units, an AVX512-BF16 server, arm64 Linux with and without bf16 and with packs that do
or do not pay, macOS on Apple silicon, a torch build without oneDNN, CUDA with and without bf16.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from opsd_core.backends.capabilities import Capabilities, CapabilityError
from opsd_core.backends.plan import MIN_PACK_SPEEDUP, make_plan
from opsd_core.config import ConfigError, Params, load_params
from tests.support import APPLE, AVX2, GRAVITON3, H100, NO_ONEDNN, SAPPHIRE, SKYLAKE, T4

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def default() -> Params:
    return load_params(ROOT / "params.yaml", "default")


def _with(params: Params, *sets: str) -> Params:
    return load_params(ROOT / "params.yaml", params.profile, list(sets))


def test_auto_on_an_avx2_cpu_samples_in_fp32_over_fp32_packs(default: Params) -> None:
    """bf16 without bf16 units is emulated (measured 9 vs 25-34 tok/s): auto must not pick it there."""
    plan = make_plan(default, AVX2)
    assert (plan.device, plan.precision, plan.sampling_dtype) == ("cpu", "float32", "float32")
    assert plan.packs == "large" and plan.pack_dtypes == ("float32",) and not plan.packable("bfloat16")
    assert plan.frozen_dtype is None and plan.teacher_dtype is None and plan.allocator == "tuned"
    assert "no bf16 units" in plan.why["sampling_dtype"] and plan.warnings == ()


def test_auto_on_cpus_with_bf16_units_samples_in_bf16(default: Params) -> None:
    for caps in (SAPPHIRE, GRAVITON3):
        plan = make_plan(default, caps)
        assert plan.sampling_dtype == "bfloat16" and plan.packable("bfloat16"), caps.machine
        assert plan.precision == "float32" and plan.packs == "large"


def test_skylake_can_pack_bf16_but_auto_keeps_fp32(default: Params) -> None:
    plan = make_plan(default, SKYLAKE)
    assert plan.sampling_dtype == "float32" and plan.packable("bfloat16")
    # explicit bf16 is honoured (oneDNN can), with a warning that it is emulated
    plan = make_plan(_with(default, "train.frozen_dtype=bfloat16", "opsd.sampling.dtype=bfloat16"), SKYLAKE)
    assert plan.frozen_dtype == "bfloat16" and plan.sampling_dtype == "bfloat16"
    assert len(plan.warnings) == 2 and all("emulated" in w for w in plan.warnings)


def test_packs_off_the_x86_family_follow_the_measured_probe(default: Params) -> None:
    assert make_plan(default, GRAVITON3).packs == "large"
    slow = replace(GRAVITON3, pack_speedup=MIN_PACK_SPEEDUP - 0.2)
    plan = make_plan(default, slow)
    assert plan.packs == "off" and plan.pack_dtypes == () and "measured 0.90x" in plan.why["packs"]
    assert plan.student_pass.startswith("peft forward")
    # an explicit "on" still packs every frozen linear where oneDNN runs at all
    assert make_plan(_with(default, "train.packed_weights=on"), slow).packs == "all"


def test_macos_and_builds_without_onednn_fall_back_to_plain_torch(default: Params) -> None:
    plan = make_plan(default, APPLE)
    assert (plan.device, plan.packs, plan.allocator, plan.sampling_dtype) == ("cpu", "off", "default", "bfloat16")
    assert "mps" in plan.why["device"].lower()  # present, but opt-in
    assert make_plan(_with(default, "train.device=mps"), APPLE).device == "mps"
    plan = make_plan(default, NO_ONEDNN)
    assert plan.packs == "off" and "no oneDNN" in plan.why["packs"]


@pytest.mark.parametrize(("caps", "sets", "needle"), [
    (AVX2, ["train.frozen_dtype=bfloat16"], "train.frozen_dtype=bfloat16 needs oneDNN bf16 packs"),
    (NO_ONEDNN, ["train.packed_weights=on"], "train.packed_weights=on needs oneDNN"),
    (NO_ONEDNN, ["train.frozen_dtype=bfloat16"], "train.frozen_dtype=bfloat16 runs through the packed CPU path"),
    (AVX2, ["train.packed_weights=on", "opsd.sampling.dtype=bfloat16"], "opsd.sampling.dtype=bfloat16 with "
                                                                       "train.packed_weights=on"),
    (AVX2, ["train.packed_weights=on", "opsd.teacher_dtype=bfloat16"], "opsd.teacher_dtype=bfloat16"),
    (APPLE, ["train.cpu_allocator=tuned"], "train.cpu_allocator=tuned needs glibc"),
    (AVX2, ["train.device=cuda"], "train.device=cuda: no CUDA device"),
    (AVX2, ["train.device=mps"], "train.device=mps: no Apple MPS device"),
    (H100, ["train.packed_weights=on"], "train.packed_weights=on is a CPU path"),
    (H100, ["train.frozen_dtype=bfloat16"], "on a GPU set train.precision instead"),
    (T4, ["train.precision=bfloat16"], "Tesla T4"),
])
def test_settings_a_machine_cannot_honour_are_one_line_errors(default: Params, caps: Capabilities, sets: list[str],
                                                              needle: str) -> None:
    with pytest.raises(CapabilityError) as err:
        make_plan(_with(default, *sets), caps)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_slow_but_correct_explicit_settings_are_kept_with_a_warning(default: Params) -> None:
    plan = make_plan(_with(default, "opsd.sampling.dtype=bfloat16", "opsd.teacher_dtype=bfloat16"), AVX2)
    assert plan.sampling_dtype == "bfloat16" and plan.teacher_dtype == "bfloat16"
    assert not plan.packable("bfloat16")  # the bf16 copies run F.linear: oneDNN cannot pack them here
    assert [w.split("=")[0] for w in plan.warnings] == ["opsd.sampling.dtype", "opsd.teacher_dtype"]
    plan = make_plan(_with(default, "train.precision=bfloat16"), AVX2)
    assert plan.precision == "bfloat16" and "emulated" in plan.warnings[0]


def test_gpus(default: Params) -> None:
    plan = make_plan(default, H100)
    assert (plan.device, plan.precision, plan.sampling_dtype, plan.packs, plan.allocator) == (
        "cuda", "bfloat16", "bfloat16", "off", "default")
    plan = make_plan(default, T4)
    assert (plan.precision, plan.sampling_dtype) == ("float32", "float32")
    # the CPU can still be asked for on a GPU machine
    assert make_plan(_with(default, "train.device=cpu"), H100).packs == "large"


def test_the_plan_record_is_plain_json(default: Params) -> None:
    import json

    record = make_plan(default, AVX2).as_dict()
    assert json.loads(json.dumps(record)) == record
    assert {"device", "precision", "sampling_dtype", "packs", "pack_dtypes", "allocator", "why"} <= set(record)


def test_several_ranks_replicate_lora_and_shard_full_fine_tuning(default: Params) -> None:
    assert make_plan(default, H100).data_parallel == "none"  # train.nproc: 1
    lora = make_plan(default, H100, world_size=4)
    assert lora.data_parallel == "ddp" and "all-reduce" in lora.why["data_parallel"]
    assert make_plan(_with(default, "train.nproc=2"), AVX2).data_parallel == "ddp"  # the setting's world size
    full = make_plan(_with(default, "lora.enabled=false"), H100, world_size=4)
    assert full.data_parallel == "fsdp2" and "sharded" in full.why["data_parallel"]
    assert make_plan(_with(default, "lora.enabled=false"), H100, world_size=1).data_parallel == "none"
    for teacher in ("ema", "live"):  # not made to work on shards: refused before any work, in one line
        with pytest.raises(ConfigError, match=f"opsd.teacher={teacher} with full fine-tuning"):
            make_plan(_with(default, "lora.enabled=false", f"opsd.teacher={teacher}"), H100, world_size=2)
