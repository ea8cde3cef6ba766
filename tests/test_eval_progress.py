"""The evaluation stage's progress line: elapsed time and an estimate of what is left, each group of tasks
estimated from the groups of its own kind already timed (in the run, or the cached base's with the same
settings), and no estimate while a kind has not been timed. The stage's real output is checked in
tests/test_run_cli.py (the main job's evaluate stages)."""

from __future__ import annotations

from opsd_core.evaluation.harness import ANSWER_GROUP, GENERATION_GROUP, LL_GROUP, task_groups
from opsd_core.evaluation.progress import EvalProgress
from opsd_core.evaluation.tasks import ANSWER_TASKS, LL_TASKS, OWN_TASKS


class Clock:
    """Seconds that pass only when the test says so (the estimate is arithmetic, not a timing)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_groups_follow_the_harness_order_and_skip_empty_kinds() -> None:
    ll = next(name for name in sorted(LL_TASKS) if name not in ANSWER_TASKS)
    answer = sorted(ANSWER_TASKS)[0]
    gen = next(name for name in OWN_TASKS if name not in LL_TASKS)
    assert task_groups([answer, ll, gen, gen], "hf") == [(GENERATION_GROUP, [gen]), (LL_GROUP, [ll]),
                                                         (ANSWER_GROUP, [answer])]
    assert task_groups([ll], "hf") == [(LL_GROUP, [ll])]
    # opsd's lm-eval model reads both cuts of a problem's tokens right: one log-likelihood group
    assert task_groups([answer, ll, gen], "opsd") == [(GENERATION_GROUP, [gen]), (LL_GROUP, [answer, ll])]


def test_base_and_candidate_in_one_run_estimate_each_kind_from_its_own() -> None:
    clock = Clock()
    steps = [(model, kind) for model in ("base", "candidate") for kind in (GENERATION_GROUP, LL_GROUP)]
    progress = EvalProgress("evaluate", steps, clock=clock)
    assert progress.opening() is None  # nothing timed yet: no estimate up front
    clock.now += 30  # loading the model and the first group
    line = progress.record("base", GENERATION_GROUP, 25.0)
    assert line == ("evaluate: 1/4 groups of tasks done, elapsed 30 s; no estimate of the rest until a "
                    "log-likelihood group is timed")
    clock.now += 5
    assert progress.record("base", LL_GROUP, 5.0).endswith("2/4 groups of tasks done, elapsed 35 s, about 30 s left")
    clock.now += 35
    # the candidate's generation took 35 s: generation groups now average 30 s, the log-likelihood one is 5 s
    assert progress.record("candidate", GENERATION_GROUP, 35.0).endswith("elapsed 70 s, about 5 s left")
    clock.now += 6
    assert progress.record("candidate", LL_GROUP, 6.0) == "evaluate: 4/4 groups of tasks done in 76 s"


def test_a_cached_base_estimates_the_candidate_up_front() -> None:
    clock = Clock()
    progress = EvalProgress("evaluate", [("candidate", GENERATION_GROUP), ("candidate", LL_GROUP)],
                            {GENERATION_GROUP: 40.0, LL_GROUP: 8.0}, clock=clock)
    assert progress.opening() == ("evaluate: 2 groups of tasks to run, about 48 s (as long as the base's groups "
                                  "took with the same settings)")
    clock.now += 50
    # this run's own generation time replaces the base's; the log-likelihood group keeps the base's
    assert progress.record("candidate", GENERATION_GROUP, 46.0).endswith("elapsed 50 s, about 8 s left")
