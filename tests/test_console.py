"""The main job's terminal (flows/console.py): which stage lines it shows, each stage's figure, and the gate in
words (opsd_core/registry/decision.plain_words)."""

from __future__ import annotations

import io

from flows.console import Console, is_news, is_progress, keep_plain, stage_figure
from opsd_core.registry.decision import plain_words


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_lines_are_kept_by_quarters_without_a_tty() -> None:
    steps = [f"step {i}/18 loss=0.1 len=20 elapsed {i} s" for i in range(1, 19)]
    assert all(is_progress(s) for s in steps)
    assert [i for i, s in enumerate(steps, 1) if keep_plain(s)] == [1, 4, 8, 12, 16, 18]
    assert is_progress("evaluate: 2 groups of tasks to run, about 30 s") and keep_plain("evaluate: 1/2 groups of tasks done")
    assert not is_progress("Generating test split: 100%|####| 41/41") and not is_news("Generating test split")
    assert is_news("opsd train: warning: bf16 unavailable") and is_news("3 of 64 rows rejected")
    assert not is_news("step 3/18 loss=0.1 (warning: none)")  # progress is never repeated as news
    # the stage's JSON result (`opsd prepare` prints it) is the task log's, not news: its done line has the figure
    assert not is_news('  "rejected": 29,') and not is_news('    "rejected": 29') and not is_news('"error": null}')
    assert is_news("[W1207 10:00:00 ProcessGroupGloo.cpp:514] Warning: no interface found")  # torch's C++ ones


def test_a_log_file_gets_plain_lines_and_a_tty_one_updating_line() -> None:
    plain = io.StringIO()
    console = Console(plain)
    for i in range(1, 5):
        console.stage_output("train", f"step {i}/4 loss=0.{i}")
    console.stage_output("train", "{")  # a report dumped key by key: the task run's log only
    console.stage_done("train", True, 12.4, "4 steps")
    assert plain.getvalue().splitlines() == [f"  train: step {i}/4 loss=0.{i}" for i in range(1, 5)] + [
        "train: done in 12 s: 4 steps"]

    tty = _Tty()
    console = Console(tty)
    for i in range(1, 5):
        console.stage_output("evaluate", f"evaluate: {i}/4 groups of tasks done, elapsed {i} s")
    console.stage_done("evaluate", False, 0.1, "")
    text = tty.getvalue()
    assert text.count("\r") == 4 and text.count("\n") == 2  # one line rewritten in place, ended before the next
    assert text.endswith("evaluate: unchanged, skipped\n") and "evaluate: evaluate:" not in text


def test_each_stage_has_its_figure() -> None:
    data = {"read": 300, "accepted": 192, "train": 151, "val": 41, "rejected": 108,
            "rejected_by_reason": {"contamination": 107, "duplicate": 1, "unverified": 0}}
    assert stage_figure("prepare", data) == ("192 of 300 rows kept (train 151, val 41); 108 rejected (107 "
                                             "contamination, 1 duplicate); contamination = overlap with the "
                                             "evaluation sets, removed on purpose")
    assert stage_figure("train", {"steps": 18, "first_loss": 0.064, "final_loss": 0.128}) == \
        "18 steps, loss 0.064 -> 0.128"
    report = {"tasks": {"opsd_val_ll": {"base": {"score": -1.2478, "n": 41}, "candidate": {"score": -1.2584, "n": 41},
                                        "diff": {"mean_diff": -0.0107, "ci_low": -0.0175, "ci_high": -0.0036}}}}
    assert stage_figure("evaluate", report) == "opsd_val_ll -1.248 -> -1.258"
    assert stage_figure("register", {"version": "3", "promoted": False}) == "v3, gate: not promoted"
    assert stage_figure("register", {"version": "3", "already_registered": True}).endswith("(same weights)")
    assert stage_figure("evaluate_base", {"tasks": {}}) == "" and stage_figure("train", None) == ""


def test_the_gate_in_words() -> None:
    verdict = {"promote": False, "checks": {
        "primary_task": "opsd_val_ll",
        "vs_base": {"passed": False, "mean_diff": -0.0107, "ci_low": -0.0175, "ci_high": -0.0036},
        "vs_champion": {"passed": True, "status": "no_champion", "reason": "vs champion: no current champion"},
        "guards": {"opsd_gsm8k100": {"passed": True, "base_score": 0.0, "candidate_score": 0.0, "tolerance": 0.05},
                   "opsd_val": {"passed": False, "base_score": 0.5, "candidate_score": 0.25, "tolerance": 0.05}}}}
    assert plain_words(verdict) == [
        "vs base on opsd_val_ll: -0.0107 [-0.0175, -0.0036], worse: the whole interval is below zero -> FAIL",
        "vs champion: no current champion -> pass",
        "guard opsd_gsm8k100: both models solve none of these, so it cannot tell them apart -> pass",
        "guard opsd_val: 0.5000 -> 0.2500, a drop beyond the tolerance 0.05 -> FAIL",
    ]
    verdict["checks"]["vs_base"].update(mean_diff=0.01, ci_low=-0.002, ci_high=0.02)
    assert "no difference it can detect: the interval includes zero" in plain_words(verdict)[0]
