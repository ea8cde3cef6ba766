"""Settings + capabilities → the execution paths a training run takes (pure; no torch calls).

Every fast path is decided here, once, before any work starts: the device, the training and
sampling dtypes, oneDNN packs (fp32, bf16), ``train.frozen_dtype``, the bf16 teacher copy and the
allocator. ``auto`` picks the fastest correct path this machine has; an explicit setting the machine
cannot honour raises :class:`CapabilityError` naming the setting and what is missing. A setting the
machine honours only slowly (bf16 without bf16 units: emulated) is kept and explained in ``warnings``.

Why the rules are what they are (measured; README "CPU paths"):
* fp32 packs beat ``F.linear`` on every x86 CPU measured (AVX2: 66 vs 87 s for two SmolLM2 steps;
  AVX-512: ~1.4x a step); on other architectures a quick probe decides (:func:`measure_pack_speedup`).
* bf16 decoding is ~2x faster than fp32 with bf16 units (AVX512-BF16, AMX) and ~3x slower without
  them (emulated: 9 vs 25-34 tok/s on an AVX2 CPU), so ``auto`` samples in bf16 only with the units.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from opsd_core.backends.capabilities import Capabilities, CapabilityError
from opsd_core.config import ConfigError, Params

PackMode = Literal["off", "large", "all"]
DataParallel = Literal["none", "ddp", "fsdp2"]
# packs must beat F.linear by this much on the probe to be chosen where the architecture cannot tell
MIN_PACK_SPEEDUP = 1.1
_ONEDNN_BF16_NEEDS = "AVX-512 BW/VL/DQ or AVX-NE-CONVERT"
_BF16_UNITS = "bf16 units (AVX512-BF16, AMX-BF16 or Arm BF16)"


@dataclass(frozen=True)
class ExecutionPlan:
    """What a run executes. Dtypes are torch dtype names ("float32", "bfloat16")."""

    device: str  # cpu | cuda | mps
    precision: str  # the trained weights (LoRA, loss and optimizer state stay fp32 regardless)
    sampling_dtype: str  # the merged copy rollouts are decoded from
    sampler: str  # engine | generate | static (opsd.sampling.backend, resolved for this device)
    teacher: str  # fixed | ema | live
    teacher_dtype: str | None  # fixed teacher: a frozen copy in this dtype (None: the policy's own weights)
    packs: PackMode  # oneDNN packed frozen linears: off, large matrices only (auto), every size (on)
    pack_dtypes: tuple[str, ...]  # weight dtypes oneDNN may pack here
    frozen_dtype: str | None  # products with frozen weights through the packs in this dtype
    allocator: Literal["tuned", "default"]
    student_pass: str
    why: dict[str, str]
    warnings: tuple[str, ...] = ()
    # several ranks: "ddp" (replicated weights, gradients all-reduced) or "fsdp2" (sharded); one: "none"
    data_parallel: DataParallel = "none"

    def packable(self, dtype: str) -> bool:
        return self.packs != "off" and dtype in self.pack_dtypes

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["pack_dtypes"] = list(self.pack_dtypes)
        out["warnings"] = list(self.warnings)
        return out


class _Notes:
    def __init__(self) -> None:
        self.why: dict[str, str] = {}
        self.warnings: list[str] = []


def _device(setting: str, caps: Capabilities, n: _Notes) -> str:
    if setting == "auto":
        if caps.cuda:
            n.why["device"] = f"auto: CUDA ({caps.cuda_name})"
            return "cuda"
        n.why["device"] = "auto: no CUDA device" + ("; MPS is present but opt-in (train.device: mps)" if caps.mps else "")
        return "cpu"
    if setting == "cuda" and not caps.cuda:
        raise CapabilityError("train.device=cuda: no CUDA device here (torch.cuda.is_available() is False)")
    if setting == "mps" and not caps.mps:
        raise CapabilityError("train.device=mps: no Apple MPS device here (torch.backends.mps.is_available() is False)")
    n.why["device"] = "set"
    return setting


def _precision(setting: str, device: str, caps: Capabilities, n: _Notes) -> str:
    if setting == "auto":
        if device == "cuda" and caps.cuda_bf16:
            n.why["precision"] = "auto: bf16 weights on a bf16-capable GPU"
            return "bfloat16"
        n.why["precision"] = "auto: fp32 weights off bf16 GPUs"
        return "float32"
    if setting == "bfloat16" and device == "cuda" and not caps.cuda_bf16:
        raise CapabilityError(f"train.precision=bfloat16: this GPU ({caps.cuda_name}) has no bf16 support")
    if setting == "bfloat16" and device == "cpu" and not caps.bf16_units:
        n.warnings.append(f"train.precision=bfloat16: no {_BF16_UNITS} on this CPU ({caps.describe()}): "
                          "bf16 arithmetic is emulated and slower than float32")
    n.why["precision"] = "set"
    return setting


def _packs(setting: str, device: str, caps: Capabilities, n: _Notes) -> PackMode:
    if device != "cpu":
        if setting == "on":
            raise CapabilityError(f"train.packed_weights=on is a CPU path (oneDNN); the device is {device}")
        n.why["packs"] = f"off: a CPU path, the device is {device}"
        return "off"
    if setting == "off":
        n.why["packs"] = "set off"
        return "off"
    if not caps.onednn_fp32:
        if setting == "on":
            raise CapabilityError("train.packed_weights=on needs oneDNN's packed linear "
                                  f"(torch.ops.mkldnn._reorder_linear_weight), missing here ({caps.describe()})")
        n.why["packs"] = "auto: off, no oneDNN packed linear in this torch build or CPU"
        return "off"
    if setting == "on":
        n.why["packs"] = "set on: every frozen linear, any size"
        return "all"
    if caps.x86:
        n.why["packs"] = "auto: on, oneDNN fp32 packs measured faster than F.linear on AVX2 and AVX-512 CPUs"
        return "large"
    speedup = caps.pack_speedup or 0.0
    if speedup >= MIN_PACK_SPEEDUP:
        n.why["packs"] = f"auto: on, measured {speedup:.2f}x F.linear on this CPU"
        return "large"
    n.why["packs"] = f"auto: off, measured {speedup:.2f}x F.linear on this CPU (< {MIN_PACK_SPEEDUP})"
    return "off"


def _bf16_copy(key: str, dtype: str | None, packs: PackMode, caps: Capabilities, n: _Notes) -> None:
    """Checks for a bf16 copy of frozen weights (the sampler's, the teacher's) on a CPU."""
    if dtype != "bfloat16":
        return
    if packs == "all" and not caps.onednn_bf16:
        raise CapabilityError(f"{key}=bfloat16 with train.packed_weights=on: oneDNN cannot pack bf16 weights on this "
                              f"CPU (needs {_ONEDNN_BF16_NEEDS}; {caps.describe()}); use auto or float32")
    if not caps.bf16_units:
        n.warnings.append(f"{key}=bfloat16: no {_BF16_UNITS} on this CPU ({caps.describe()}): emulated, "
                          "measured ~3x slower than float32 (9 vs 25-34 tok/s decoding SmolLM2 on AVX2)")


def _sampling(setting: str, device: str, precision: str, caps: Capabilities, n: _Notes) -> str:
    if setting != "auto":
        n.why["sampling_dtype"] = "set"
        return setting
    if device == "cuda":
        n.why["sampling_dtype"] = "auto: bf16 on a bf16 GPU" if caps.cuda_bf16 else "auto: no bf16 on this GPU"
        return "bfloat16" if caps.cuda_bf16 else "float32"
    if device == "cpu" and caps.bf16_units:
        n.why["sampling_dtype"] = "auto: bf16, this CPU has bf16 units (decoding is memory-bound: ~2x fp32)"
        return "bfloat16"
    if device == "cpu":
        n.why["sampling_dtype"] = "auto: float32, no bf16 units on this CPU (bf16 would be emulated, ~3x slower)"
        return "float32"
    n.why["sampling_dtype"] = "auto: the training precision"
    return precision


def _frozen(setting: str | None, packs: PackMode, packs_setting: str, device: str, caps: Capabilities,
            n: _Notes) -> str | None:
    if setting is None:
        return None
    if packs == "off":
        raise CapabilityError(
            f"train.frozen_dtype={setting} runs through the packed CPU path, which is off here "
            f"(train.packed_weights={packs_setting}, device {device}"
            + ("" if device != "cpu" or caps.onednn_fp32 else ", no oneDNN packed linear")
            + "); on a GPU set train.precision instead")
    if setting == "bfloat16" and not caps.onednn_bf16:
        raise CapabilityError(f"train.frozen_dtype=bfloat16 needs oneDNN bf16 packs ({_ONEDNN_BF16_NEEDS}), missing "
                              f"on this CPU ({caps.describe()}); leave it null")
    if setting == "bfloat16" and not caps.bf16_units:
        n.warnings.append(f"train.frozen_dtype=bfloat16: no {_BF16_UNITS} on this CPU ({caps.describe()}): the bf16 "
                          "products are emulated and likely slower than fp32")
    return setting


def _allocator(setting: str, device: str, caps: Capabilities, n: _Notes) -> Literal["tuned", "default"]:
    if device != "cpu" or setting == "default":
        n.why["allocator"] = "default" + ("" if device == "cpu" else f": the device is {device}")
        return "default"
    if caps.mallopt:
        n.why["allocator"] = f"{setting}: glibc mallopt keeps activation-sized blocks in the heap"
        return "tuned"
    if setting == "tuned":
        raise CapabilityError(f"train.cpu_allocator=tuned needs glibc's mallopt, missing here ({caps.system}); "
                              "use auto or default")
    n.why["allocator"] = f"auto: default, no glibc mallopt ({caps.system})"
    return "default"


def _sampler(setting: str, device: str, n: _Notes) -> str:
    if setting != "auto":
        n.why["sampler"] = "set"
        return setting
    if device == "cpu":
        n.why["sampler"] = "auto: opsd engine on a CPU (2.8x transformers' compiled static cache, fp32)"
        return "engine"
    if device == "cuda":
        n.why["sampler"] = "auto: transformers' static KV cache, compiled, on CUDA (6.5x the engine at 16 rows)"
        return "static"
    n.why["sampler"] = f"auto: transformers generate on {device}"
    return "generate"


def _data_parallel(world_size: int, lora: bool, teacher: str, n: _Notes) -> DataParallel:
    if world_size <= 1:
        return "none"
    if lora:
        n.why["data_parallel"] = (f"ddp over {world_size} ranks: LoRA trains a few adapter weights, so every rank "
                                  "keeps the frozen base and the adapter's gradients are summed (all-reduce)")
        return "ddp"
    if teacher != "fixed":
        # the EMA teacher swaps averaged weights into the policy's parameters, and the live teacher scores
        # through the policy: neither has been made to work on parameters that are FSDP shards
        raise ConfigError(f"opsd.teacher={teacher} with full fine-tuning (lora.enabled: false) on {world_size} ranks "
                          "(FSDP2) is not supported: use opsd.teacher=fixed, LoRA, or one process (train.nproc=1)")
    n.why["data_parallel"] = (f"fsdp2 over {world_size} ranks: full fine-tuning; weights, gradients and AdamW "
                              f"state are sharded (1/{world_size} on each rank) instead of replicated")
    return "fsdp2"


def make_plan(params: Params, caps: Capabilities, world_size: int | None = None) -> ExecutionPlan:
    """The paths ``params`` asks for on a machine with ``caps``, trained by ``world_size`` processes (default
    ``train.nproc``); raises :class:`CapabilityError` (or :class:`ConfigError` for a combination opsd lacks)."""
    train, opsd = params.train, params.opsd
    n = _Notes()
    data_parallel = _data_parallel(world_size or train.nproc, params.lora.enabled, opsd.teacher, n)
    device = _device(train.device, caps, n)
    precision = _precision(train.precision, device, caps, n)
    packs = _packs(train.packed_weights, device, caps, n)
    frozen = _frozen(train.frozen_dtype, packs, train.packed_weights, device, caps, n)
    sampling = _sampling(opsd.sampling.dtype, device, precision, caps, n)
    teacher = opsd.teacher_dtype if opsd.teacher_dtype != precision else None
    if device == "cpu":
        _bf16_copy("opsd.sampling.dtype", sampling if sampling != precision else None, packs, caps, n)
        _bf16_copy("opsd.teacher_dtype", teacher, packs, caps, n)
    pack_dtypes = ("float32", "bfloat16") if caps.onednn_bf16 else ("float32",)
    if packs == "off":
        student = "peft forward, F.linear"
    elif params.lora.enabled:
        student = f"plain LoRA linears as one fused node over oneDNN {frozen or precision} packs"
    else:
        student = "full fine-tuning: every weight trains, nothing to pack"
    return ExecutionPlan(
        device=device, precision=precision, sampling_dtype=sampling,
        sampler=_sampler(opsd.sampling.backend, device, n), teacher=opsd.teacher, teacher_dtype=teacher,
        packs=packs,
        pack_dtypes=pack_dtypes if packs != "off" else (), frozen_dtype=frozen,
        allocator=_allocator(train.cpu_allocator, device, caps, n), student_pass=student, why=n.why,
        warnings=tuple(n.warnings), data_parallel=data_parallel,
    )
