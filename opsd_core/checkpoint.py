"""Training checkpoints: atomic save, latest lookup, retention, and full RNG state.

A checkpoint holds tensors, numbers, strings, lists, tuples and dicts only (the numpy RNG state is
stored as a list), so it loads with ``torch.load(weights_only=True)``: a file someone else wrote cannot
run code when it is resumed, and a file that is not an opsd checkpoint is a clear error.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from opsd_core.errors import OpsdError
from opsd_core.io import atomic_dir

PREFIX = "step-"
FORMAT = "opsd-checkpoint/1"


class CheckpointError(OpsdError, RuntimeError):
    """A checkpoint file that cannot be loaded safely (corrupt, truncated, foreign or unsafe)."""


@dataclass
class Checkpoint:
    step: int
    path: Path


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),  # plain types: loadable with weights_only
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete(run_dir: Path) -> list[Checkpoint]:
    """The complete checkpoints in ``run_dir``, newest first (incomplete ones are never renamed into place)."""
    if not run_dir.is_dir():
        return []
    found = [
        Checkpoint(int(p.name[len(PREFIX):]), p)
        for p in run_dir.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit() and (p / "state.pt").is_file()
    ]
    return sorted(found, key=lambda c: c.step, reverse=True)


def latest(run_dir: Path) -> Checkpoint | None:
    """The newest complete checkpoint in ``run_dir``."""
    found = complete(run_dir)
    return found[0] if found else None


def save(run_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` for ``step`` atomically (temp dir, then rename) and prune old checkpoints."""
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"{PREFIX}{step:07d}"
    try:
        with atomic_dir(final) as tmp:
            torch.save({"format": FORMAT, **state}, tmp / "state.pt")
    except OSError as err:  # a full disk, a quota, a vanished mount: the older checkpoints stay as they were
        newest = latest(run_dir)
        where = f"step {newest.step}" if newest else "the start"
        raise CheckpointError(f"cannot write the step-{step} checkpoint in {run_dir}: {err.strerror or err}; "
                              f"free space and rerun `opsd train`: it resumes from {where}") from err
    complete = sorted(
        (p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX)), key=lambda p: p.name
    )
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def prune_other_runs(run_dir: Path, started: float) -> list[Path]:
    """Remove the checkpoint folders of other trainings beside ``run_dir``; returns what was removed.

    Called when the training in ``run_dir`` has finished and written its candidate. ``keep_checkpoints``
    bounds one training's folder, but every new data version or setting trains under a new run key, so
    without this the checkpoints of every past training would stay for good (one training's worth per
    scheduled run). The finished training keeps its own (a rerun of it is still instant); a folder written
    since ``started`` (a time.time()) belongs to a training running beside this one and is left alone.
    """
    removed = []
    for other in sorted(run_dir.parent.iterdir()) if run_dir.parent.is_dir() else []:
        if other == run_dir or not other.is_dir():
            continue
        newest = max((p.stat().st_mtime for p in other.rglob("*")), default=other.stat().st_mtime)
        if newest < started:
            shutil.rmtree(other, ignore_errors=True)
            removed.append(other)
    return removed


def load(ckpt: Checkpoint) -> dict[str, Any]:
    """The state saved at ``ckpt``; :class:`CheckpointError` for a file that is corrupt, not ours or unsafe."""
    path = ckpt.path / "state.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every way a foreign or damaged file fails to load reads the same
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a loadable opsd checkpoint ({type(err).__name__}: {first[:200]})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an opsd checkpoint (no format {FORMAT!r})")
    return state
