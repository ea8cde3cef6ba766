"""What this machine can do, probed once per process: the facts :mod:`opsd_core.backends.plan` decides from.

Machines differ: some x86 CPUs have AVX-512 with bf16 dot-product units, many have AVX2 only (no
bf16 arithmetic: torch emulates it, and oneDNN refuses to reorder bf16 weights), arm64 has
neither family. Nothing here assumes: every fact is read from the OS or from a real call into
torch, and a failed call is a missing capability, never a crash.

Two environment variables pretend a capability is missing, so the paths a machine lacks run in
every test run on any CPU:

* ``OPSD_CPU_ISA=avx2|avx512`` caps the instruction set: opsd sets the libraries' own caps
  (``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``, ``MKL_ENABLE_INSTRUCTIONS``), so torch, oneDNN
  and MKL really run the AVX2 (or AVX-512 without bf16) kernels, and the flags opsd reports are cut
  to that level. ``avx2`` is the common cloud VM or laptop; ``avx512`` a Skylake-class server. Set it
  before the process first runs a torch kernel (the libraries read it once).
* ``OPSD_HIDE=onednn,bf16,mallopt,cuda,mps`` (any subset) reports those as missing: ``onednn``
  the packed linear (as on a torch build without it), ``bf16`` native bf16 units, ``mallopt``
  glibc's allocator knobs (as on macOS or musl), ``cuda``/``mps`` the accelerators.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from opsd_core.errors import SettingError
from opsd_core.layout import Env

ISA_ENV, HIDE_ENV = Env.CPU_ISA, Env.HIDE
HIDEABLE = ("onednn", "bf16", "mallopt", "cuda", "mps")
# the libraries' own caps for each simulated level (torch's dispatcher, oneDNN, MKL)
ISA_CAPS = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
               "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
}
# CPU flags worth reporting (Linux /proc/cpuinfo names); the rest say nothing about our paths
X86_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "avx_vnni", "avx_ne_convert")
ARM_FLAGS = ("asimd", "asimdhp", "fphp", "bf16", "i8mm", "sve", "sve2", "sme")
# what survives each simulated cap: AVX2 machines have none of the AVX-512 family; a Skylake-class
# AVX-512 machine has the core subset but no bf16/fp16 units or AMX
_ISA_KEEP = {
    "avx2": {"avx", "avx2", "fma", "f16c", "avx_vnni"},
    "avx512": {"avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"},
}
# bf16 products with a hardware dot product (else torch and oneDNN emulate them: slower than fp32)
X86_BF16_UNITS = ("avx512_bf16", "amx_bf16")
# oneDNN reorders bf16 weights only with these (its own check)
X86_ONEDNN_BF16 = (("avx512bw", "avx512vl", "avx512dq"), ("avx_ne_convert",))


class CapabilityError(SettingError):
    """A setting this machine cannot honour, or a bad simulation variable."""


@dataclass(frozen=True)
class Capabilities:
    """One machine's relevant facts. ``hidden``/``isa_cap`` record what the environment pretended."""

    machine: str  # platform.machine(): x86_64, AMD64, aarch64, arm64
    system: str  # Linux, Darwin, Windows
    torch_cpu: str  # torch.backends.cpu.get_cpu_capability(): DEFAULT, AVX2, AVX512, SVE256, ...
    flags: tuple[str, ...]  # the relevant instruction-set flags present (after the simulated cap)
    onednn_fp32: bool  # oneDNN's packed linear runs and matches F.linear in fp32
    onednn_bf16: bool  # ... and reorders bf16 weights
    bf16_units: bool  # native bf16 dot products (AVX512-BF16, AMX-BF16, Arm FEAT_BF16)
    mallopt: bool  # glibc's mallopt is there (Linux with glibc)
    cuda: bool
    cuda_bf16: bool
    mps: bool
    cuda_name: str | None = None
    isa_cap: str | None = None
    hidden: tuple[str, ...] = ()
    # packed / F.linear time on a small fp32 product, where the architecture alone cannot tell
    # whether packs pay (measured on non-x86 CPUs only; None elsewhere)
    pack_speedup: float | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def x86(self) -> bool:
        return self.machine.lower() in ("x86_64", "amd64", "x86", "i686")

    def describe(self) -> str:
        """One short phrase for errors: what this CPU is."""
        tag = f"{self.machine}, torch CPU capability {self.torch_cpu}"
        if self.isa_cap:
            tag += f", {ISA_ENV}={self.isa_cap}"
        if self.hidden:
            tag += f", {HIDE_ENV}={','.join(self.hidden)}"
        return tag

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["flags"] = list(self.flags)
        out["hidden"] = list(self.hidden)
        out["notes"] = list(self.notes)
        return out


def isa_cap() -> str | None:
    """The simulated instruction-set level from ``OPSD_CPU_ISA`` (None: the real one)."""
    value = os.environ.get(ISA_ENV, "").strip().lower()
    if not value or value in ("native", "none"):
        return None
    if value not in ISA_CAPS:
        raise CapabilityError(f"{ISA_ENV}={value!r}: use one of {', '.join(ISA_CAPS)} (or leave it unset)")
    if platform.machine().lower() not in ("x86_64", "amd64", "x86", "i686"):
        return None  # x86 instruction sets: nothing to cap on arm64 (OPSD_HIDE still applies)
    return value


def apply_isa_cap() -> None:
    """Pass ``OPSD_CPU_ISA`` on to torch, oneDNN and MKL. Cheap and import-free: called where a process starts
    (``flows/cli.py: main``, ``tests/conftest.py``, the benchmarks' process set-up), before torch runs a kernel
    (the libraries read their variables once, on first use). Importing opsd does not call it: a script of
    your own that imports opsd and honours ``OPSD_CPU_ISA`` calls it first."""
    try:
        cap = isa_cap()
    except CapabilityError:
        return  # reported by probe(), where it can be a one-line error
    if cap is not None:
        os.environ.update(ISA_CAPS[cap])


def hidden() -> tuple[str, ...]:
    raw = [h.strip().lower() for h in os.environ.get(HIDE_ENV, "").split(",") if h.strip()]
    unknown = sorted(set(raw) - set(HIDEABLE))
    if unknown:
        raise CapabilityError(f"{HIDE_ENV}: unknown capability {', '.join(unknown)} (use any of {', '.join(HIDEABLE)})")
    return tuple(sorted(set(raw)))


def _linux_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def _darwin_flags() -> set[str]:
    """Apple silicon reports its features through sysctl (hw.optional.arm.FEAT_*)."""
    names = {"bf16": "hw.optional.arm.FEAT_BF16", "i8mm": "hw.optional.arm.FEAT_I8MM",
             "asimdhp": "hw.optional.arm.FEAT_FP16", "sme": "hw.optional.arm.FEAT_SME"}
    out = set()
    for flag, key in names.items():
        try:
            done = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            continue
        if done.stdout.strip() == "1":
            out.add(flag)
    if platform.machine().lower() == "arm64":
        out.add("asimd")
    return out


def cpu_flags(machine: str, system: str, cap: str | None) -> tuple[str, ...]:
    """The relevant instruction-set flags of this CPU, cut to the simulated level."""
    found = _linux_flags() if system == "Linux" else _darwin_flags() if system == "Darwin" else set()
    x86 = machine.lower() in ("x86_64", "amd64", "x86", "i686")
    relevant = [f for f in (X86_FLAGS if x86 else ARM_FLAGS) if f in found]
    if cap is not None and x86:
        relevant = [f for f in relevant if f in _ISA_KEEP[cap]]
    return tuple(relevant)


def _onednn_works(dtype: Any) -> bool:
    """A real packed product in ``dtype``: the reorder and the call both run, and the result is right."""
    import torch

    try:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(16, 8, generator=gen).to(dtype)
        x = torch.randn(3, 8, generator=gen).to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        ref = (x.float() @ w.float().t())
        return bool(torch.allclose(out.float(), ref, atol=1e-5 if dtype == torch.float32 else 5e-2, rtol=1e-2))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def measure_pack_speedup(rows: tuple[int, ...] = (4, 256), size: int = 576, repeats: int = 20) -> float:
    """F.linear time / packed time for fp32 products of SmolLM2's layer size, at decoding's and a training
    micro-batch's row counts (the smaller of the two ratios). Takes ~0.1 s. Above 1: packs are faster."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(size, size, generator=gen)
    packed = torch.ops.mkldnn._reorder_linear_weight(w)
    ratios = []
    for m in rows:
        x = torch.randn(m, size, generator=gen)
        timings = {}
        for name, fn in (("plain", lambda x=x: F.linear(x, w)),
                         ("packed", lambda x=x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""))):
            fn()
            best = float("inf")
            for _ in range(3):  # best of 3 batches: the least disturbed by whatever else runs
                start = time.perf_counter()
                for _ in range(repeats):
                    fn()
                best = min(best, time.perf_counter() - start)
            timings[name] = best
        ratios.append(timings["plain"] / timings["packed"])
    return min(ratios)


def _has_mallopt() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return hasattr(libc, "mallopt")
    except OSError:
        return False


@functools.cache
def probe() -> Capabilities:
    """This process's capabilities, after the simulation variables (probed once; ~0.1 s)."""
    import torch

    cap, hide = isa_cap(), hidden()
    machine, system = platform.machine() or "unknown", platform.system()
    x86 = machine.lower() in ("x86_64", "amd64", "x86", "i686")
    torch_cpu = torch.backends.cpu.get_cpu_capability()
    notes = []
    if x86 and cap is None and torch_cpu == "AVX2" and "avx512f" in cpu_flags(machine, system, None):
        # torch was capped below the CPU (ATEN_CPU_CAPABILITY set by hand, or inherited): report what runs
        cap = "avx2"
        notes.append("torch runs its AVX2 kernels on this AVX-512 CPU (ATEN_CPU_CAPABILITY): flags cut to AVX2")
    flags = cpu_flags(machine, system, cap)
    onednn_fp32 = "onednn" not in hide and _onednn_works(torch.float32)
    onednn_bf16 = onednn_fp32 and _onednn_works(torch.bfloat16)
    if cap is not None and not any(all(f in flags for f in need) for need in X86_ONEDNN_BF16):
        # oneDNN reads the cap only once: a process that ran oneDNN before OPSD_CPU_ISA was set still could
        onednn_bf16 = False
    if x86:
        bf16_units = any(f in flags for f in X86_BF16_UNITS)
    else:
        bf16_units = "bf16" in flags
    bf16_units = bf16_units and "bf16" not in hide
    speedup = None
    if onednn_fp32 and not x86:
        speedup = measure_pack_speedup()
        notes.append(f"packed fp32 linear measured {speedup:.2f}x F.linear on this CPU")
    cuda = "cuda" not in hide and torch.cuda.is_available()
    mps_backend = getattr(torch.backends, "mps", None)
    mps = "mps" not in hide and bool(mps_backend and mps_backend.is_available())
    return Capabilities(
        machine=machine, system=system, torch_cpu=torch_cpu, flags=flags,
        onednn_fp32=onednn_fp32, onednn_bf16=onednn_bf16, bf16_units=bf16_units,
        mallopt="mallopt" not in hide and _has_mallopt(),
        cuda=cuda, cuda_bf16=cuda and torch.cuda.is_bf16_supported(), mps=mps,
        cuda_name=torch.cuda.get_device_name(0) if cuda else None,
        isa_cap=cap, hidden=hide, pack_speedup=speedup, notes=tuple(notes),
    )
