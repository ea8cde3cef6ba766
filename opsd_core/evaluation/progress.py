"""How far an evaluation stage is: after each group of tasks, the time elapsed and an estimate of the rest.

lm-eval runs a model's tasks in groups of one kind (generation, log-likelihood; ``harness.task_groups``) whose
costs per problem differ by orders of magnitude, so a group still to run is estimated from the groups of its
kind already timed: in this process, or (the candidate stage reading a cached base) the base's own groups,
timed with the same settings hash, hence the same tasks and problems. A kind that nobody has timed yet gives
no estimate rather than a guess from another kind.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class EvalProgress:
    """``steps``: the (model, kind) groups the stage will run, in order; ``prior``: kind -> seconds of a group
    of that kind timed earlier with the same settings (the cached base's)."""

    stage: str
    steps: list[tuple[str, str]]
    prior: dict[str, float] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic
    done: list[tuple[str, str, float]] = field(default_factory=list)
    started: float = field(init=False)

    def __post_init__(self) -> None:
        self.started = self.clock()

    def _per_kind(self) -> dict[str, float]:
        """Mean seconds of a group of each kind: this run's groups, else the prior's."""
        seen: dict[str, list[float]] = {}
        for _, kind, seconds in self.done:
            seen.setdefault(kind, []).append(seconds)
        return {**self.prior, **{kind: sum(s) / len(s) for kind, s in seen.items()}}

    def left(self) -> tuple[float | None, list[str]]:
        """(estimated seconds for the groups not run yet, or None; the kinds nothing has timed yet)."""
        per_kind = self._per_kind()
        remaining = [kind for _, kind in self.steps[len(self.done):]]
        unknown = sorted({kind for kind in remaining if kind not in per_kind})
        return (None if unknown else sum(per_kind[kind] for kind in remaining)), unknown

    def opening(self) -> str | None:
        """A line before the first group, when every group can be estimated already (from the prior)."""
        estimate, _ = self.left()
        if estimate is None or not self.steps:
            return None
        return (f"{self.stage}: {len(self.steps)} groups of tasks to run, about {estimate:.0f} s "
                "(as long as the base's groups took with the same settings)")

    def record(self, model: str, kind: str, seconds: float) -> str:
        """Note a finished group; the progress line to print."""
        self.done.append((model, kind, seconds))
        elapsed = self.clock() - self.started
        head = f"{self.stage}: {len(self.done)}/{len(self.steps)} groups of tasks done"
        if len(self.done) >= len(self.steps):
            return f"{head} in {elapsed:.0f} s"
        estimate, unknown = self.left()
        if estimate is None:
            kinds = " and ".join(f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}" for kind in unknown)
            return f"{head}, elapsed {elapsed:.0f} s; no estimate of the rest until {kinds} group is timed"
        return f"{head}, elapsed {elapsed:.0f} s, about {estimate:.0f} s left"
