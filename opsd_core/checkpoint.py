"""Training checkpoints: atomic save, latest lookup, retention, and full RNG state."""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

PREFIX = "step-"


@dataclass
class Checkpoint:
    step: int
    path: Path


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest(run_dir: Path) -> Checkpoint | None:
    """The newest complete checkpoint in ``run_dir`` (incomplete ones are never renamed into place)."""
    if not run_dir.is_dir():
        return None
    found = [
        Checkpoint(int(p.name[len(PREFIX):]), p)
        for p in run_dir.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.pt").is_file()
    ]
    return max(found, key=lambda c: c.step, default=None)


def save(run_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` for ``step`` atomically (temp dir, then rename) and prune old checkpoints."""
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"{PREFIX}{step:07d}"
    tmp = run_dir / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    complete = sorted(
        (p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX)), key=lambda p: p.name
    )
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(ckpt: Checkpoint) -> dict[str, Any]:
    # our own files: full pickles (RNG states, optimizer state) are required
    return torch.load(ckpt.path / "state.pt", map_location="cpu", weights_only=False)
