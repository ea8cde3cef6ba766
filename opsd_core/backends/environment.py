"""``opsd env``: this machine, the paths a run with these params would take, and the library versions.

The same record goes into ``reports/train.json`` (keys ``machine``, ``execution``, ``versions``) and
the MLflow run, so a result can be traced to the CPU or GPU path that produced it.
"""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.version import Version

from opsd_core.backends.capabilities import HIDE_ENV, ISA_ENV, Capabilities, probe
from opsd_core.backends.plan import ExecutionPlan, make_plan
from opsd_core.config import Params
from opsd_core.errors import SettingError
from opsd_core.io import file_hash

PACKAGES = ("torch", "transformers", "peft", "accelerate", "tokenizers", "lm_eval", "mlflow", "prefect", "dvc",
            "reasoning_gym")


LOCK_FILE = Path(__file__).resolve().parents[2] / "constraints.txt"


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def lock_differences(lock: Path = LOCK_FILE) -> dict[str, tuple[str, str | None]]:
    """{package: (locked version, installed version or None)} for every pin of ``lock`` this environment
    does not hold (local labels such as ``+cpu`` ignored)."""
    out: dict[str, tuple[str, str | None]] = {}
    for line in lock.read_text(encoding="utf-8").splitlines():
        name, sep, pinned = line.split("#", 1)[0].strip().partition("==")
        if not sep:
            continue
        installed = _installed(name)
        if installed is None or Version(installed).public != Version(pinned).public:
            out[name] = (pinned, installed)
    return out


def versions() -> dict[str, str | None]:
    """Installed versions of the stack (read from package metadata: nothing is imported), and how this
    environment compares with the pinned stack (``constraints.txt``): its hash and the pins it misses."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        out[name] = _installed(name.replace("_", "-"))
    if LOCK_FILE.is_file():
        diff = lock_differences()
        out["lock_sha256"] = file_hash(LOCK_FILE)
        out["lock_differences"] = "; ".join(f"{k} {v[0]} (installed {v[1]})" for k, v in sorted(diff.items())) or "none"
    else:  # installed from a wheel: the lock lives in the source tree only
        out["lock_sha256"] = out["lock_differences"] = None
    return out


def report(params: Params) -> dict[str, Any]:
    """The whole record; an impossible explicit setting (or combination) is reported, not raised (``plan_error``)."""
    caps = probe()
    out: dict[str, Any] = {"machine": caps.as_dict(), "versions": versions(), "profile": params.profile}
    try:
        out["execution"] = make_plan(params, caps).as_dict()
    except SettingError as err:  # CapabilityError, or the ConfigError of a combination opsd does not run
        out["plan_error"] = str(err)
    return out


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _machine_lines(caps: Capabilities) -> list[str]:
    lines = [
        f"machine      {caps.machine} ({caps.system}), torch CPU capability {caps.torch_cpu}",
        f"cpu flags    {' '.join(caps.flags) or '(none of the relevant ones)'}",
        f"oneDNN packs fp32 {_yes(caps.onednn_fp32)}, bf16 {_yes(caps.onednn_bf16)}"
        + (f" (packed/F.linear {caps.pack_speedup:.2f}x)" if caps.pack_speedup else ""),
        f"bf16 units   {_yes(caps.bf16_units)}",
        f"glibc malloc {_yes(caps.mallopt)}",
        f"cuda         {caps.cuda_name or 'no'}" + (f" (bf16 {_yes(caps.cuda_bf16)})" if caps.cuda else ""),
        f"mps          {_yes(caps.mps)}",
    ]
    if caps.isa_cap or caps.hidden:
        lines.append(f"simulated    {ISA_ENV}={caps.isa_cap or ''} {HIDE_ENV}={','.join(caps.hidden)}")
    return lines


_TEACHERS = {"fixed": "the policy's base (adapter off), no copy", "ema": "a moving average of the trained weights",
             "live": "the current weights without gradient"}


def _plan_lines(plan: ExecutionPlan) -> list[str]:
    packs = {"off": "off", "large": "on (matrices of 2^17+ elements)", "all": "on (every frozen linear)"}[plan.packs]
    rows = [
        ("device", plan.device, plan.why.get("device", "")),
        ("weights", plan.precision, plan.why.get("precision", "")),
        ("sampling", plan.sampling_dtype, plan.why.get("sampling_dtype", "")),
        ("teacher", plan.teacher + (f", a frozen {plan.teacher_dtype} copy" if plan.teacher_dtype else
                                    f", {_TEACHERS[plan.teacher]}"), ""),
        ("oneDNN packs", packs + (f", {'/'.join(plan.pack_dtypes)}" if plan.pack_dtypes else ""),
         plan.why.get("packs", "")),
        ("frozen dtype", plan.frozen_dtype or "the weights' own", ""),
        ("student pass", plan.student_pass, ""),
        ("allocator", plan.allocator, plan.why.get("allocator", "")),
    ]
    if plan.data_parallel != "none":
        rows.append(("parallelism", plan.data_parallel, plan.why.get("data_parallel", "")))
    lines = [f"  {k:13s}{v}" + (f"  [{why}]" if why and why != "set" else "") for k, v, why in rows]
    lines += [f"  warning: {w}" for w in plan.warnings]
    return lines


def render(record: dict[str, Any], params: Params) -> str:
    caps = probe()
    lines = _machine_lines(caps)
    lines.append(f"paths for profile {params.profile!r}:")
    if "plan_error" in record:
        lines.append(f"  error: {record['plan_error']}")
    else:
        lines += _plan_lines(make_plan(params, caps))
    lines.append("versions     " + ", ".join(f"{k} {v}" for k, v in record["versions"].items() if v))
    return "\n".join(lines)
