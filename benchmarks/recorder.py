"""Phase clock for training steps: whole step, sampling, optimizer; scoring is the remainder.

The whole step is measured end to end (from the previous step's end, so nothing between steps escapes
the clock); ``score_s = step_s - sample_s - opt_s`` then holds prompt building, teacher and student
passes, the loss and backward. Each phase also gets its own peak memory (see ``PeakMemory``).
"""

from __future__ import annotations

from typing import Any

from benchmarks.common import Clock, PeakMemory


class StepRecorder:
    def __init__(self, device: str) -> None:
        self.clock = Clock(device)
        self.mem = PeakMemory(device)
        self.steps: list[dict[str, Any]] = []
        self._prev_end: float | None = None
        self._reset_step()

    def _reset_step(self) -> None:
        self._sample_start = self._opt_start = 0.0
        self._sample_s = 0.0
        self._tokens = 0
        self._peaks = {"sample": 0.0, "score": 0.0, "opt": 0.0}
        self._extra: dict[str, Any] = {}

    def step_begin(self) -> None:
        now = self.clock.now()
        if self._prev_end is None:
            self._prev_end = now
        self.mem.reset()

    def sample_begin(self) -> None:
        self._peaks["score"] = max(self._peaks["score"], self.mem.read_mb())
        self.mem.reset()
        self._sample_start = self.clock.now()

    def sample_end(self, tokens: int) -> None:
        self._sample_s += self.clock.now() - self._sample_start
        self._tokens += tokens
        self._peaks["sample"] = max(self._peaks["sample"], self.mem.read_mb())
        self.mem.reset()

    def opt_begin(self) -> None:
        self._opt_start = self.clock.now()
        self._peaks["score"] = max(self._peaks["score"], self.mem.read_mb())
        self.mem.reset()

    def note(self, **extra: Any) -> None:
        self._extra.update(extra)

    def step_end(self) -> None:
        now = self.clock.now()
        assert self._prev_end is not None, "step_end before step_begin"
        step_s = now - self._prev_end
        opt_s = now - self._opt_start if self._opt_start else 0.0
        self._peaks["opt"] = self.mem.read_mb()
        self.steps.append({
            "step_s": step_s,
            "sample_s": self._sample_s,
            "opt_s": opt_s,
            "score_s": max(step_s - self._sample_s - opt_s, 0.0),
            "tokens": self._tokens,
            "peak_sample_mb": self._peaks["sample"],
            "peak_score_mb": self._peaks["score"],
            "peak_opt_mb": self._peaks["opt"],
            **self._extra,
        })
        self._prev_end = now
        self._reset_step()
