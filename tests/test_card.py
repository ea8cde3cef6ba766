"""The numbers people read: every score with its 95% interval, bounded to [0, 1] for accuracies only, in the
model card, the evaluation plot and the Prefect table; and the card's settings are the ones that apply.

The expected numbers are computed here from the samples, apart from the code under test."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

import pytest

from flows.artifacts import eval_table
from opsd_core.config import Params
from opsd_core.evaluation.bootstrap import paired_bootstrap
from opsd_core.registry.card import model_card, plot_eval

ACC, ACC_GSM, FLEX = "opsd_val", "opsd_gsm8k100", "opsd_val_flex"
LL, LL_GSM, ANSWER_LL = "opsd_val_ll", "opsd_gsm8k100_ll", "opsd_val_answer_ll"
ACCURACIES, LOGLIKS = (ACC, ACC_GSM, FLEX), (LL, LL_GSM, ANSWER_LL)
METRIC = {ACC: "exact_match,all_samples", ACC_GSM: "exact_match,all_samples", FLEX: "exact_match_flex,all_samples",
          LL: "loglikelihood_per_token", LL_GSM: "loglikelihood_per_token", ANSWER_LL: "loglikelihood_per_token"}
Z = 1.96


# -- a report with known samples --------------------------------------------------------------------
def _accuracy_samples(solved: list[int], k: int = 4) -> dict[str, list[float]]:
    """Problem i: ``solved[i]`` of ``k`` samples correct."""
    return {f"p{i}": [1.0] * s + [0.0] * (k - s) for i, s in enumerate(solved)}


def _ll_samples(values: list[float]) -> dict[str, list[float]]:
    return {f"p{i}": [v] for i, v in enumerate(values)}


SAMPLES: dict[str, dict[str, dict[str, list[float]]]] = {
    # the candidate solves nearly everything: its unbounded upper end lies above 1
    ACC: {"base": _accuracy_samples([1, 0, 2, 0, 1, 3, 0, 0, 1, 2]),
          "candidate": _accuracy_samples([4, 4, 4, 4, 3, 4, 4, 4, 4, 4])},
    # nothing solved by the base: its interval is [0, 0]
    ACC_GSM: {"base": _accuracy_samples([0] * 8), "candidate": _accuracy_samples([0, 1, 0, 0, 2, 0, 0, 0])},
    FLEX: {"base": _accuracy_samples([2, 1, 2, 0, 1, 3, 1, 0, 1, 2]),
           "candidate": _accuracy_samples([4, 3, 4, 4, 3, 4, 2, 4, 4, 4])},
    # mean log-probability per token: negative, around -0.83 as in the issue
    LL: {"base": _ll_samples([-0.91, -0.78, -1.02, -0.84, -0.69, -0.95, -0.88, -0.73]),
         "candidate": _ll_samples([-0.86, -0.74, -0.97, -0.80, -0.66, -0.90, -0.85, -0.70])},
    LL_GSM: {"base": _ll_samples([-1.21, -1.05, -1.33, -0.98, -1.12]),
             "candidate": _ll_samples([-1.18, -1.01, -1.30, -0.99, -1.08])},
    ANSWER_LL: {"base": _ll_samples([-2.4, -0.3, -1.7, -3.1, -0.9, -2.2]),
                "candidate": _ll_samples([-2.1, -0.2, -1.5, -2.9, -0.8, -2.0])},
}


def _per_problem(samples: dict[str, list[float]]) -> list[float]:
    return [sum(v) / len(v) for _, v in sorted(samples.items())]


def expected(task: str, who: str) -> tuple[float, float, float]:
    """(mean, low, high): the normal 95% interval on the mean of the per-problem scores, cut to [0, 1] for
    accuracies only."""
    xs = _per_problem(SAMPLES[task][who])
    mean = statistics.fmean(xs)
    half = Z * statistics.stdev(xs) / math.sqrt(len(xs))
    low, high = mean - half, mean + half
    if task in ACCURACIES:
        low, high = max(0.0, low), min(1.0, high)
    return mean, low, high


def _side(task: str, who: str, with_metric: bool) -> dict[str, Any]:
    samples = SAMPLES[task][who]
    side: dict[str, Any] = {"score": statistics.fmean(_per_problem(samples)), "n": len(samples),
                            "k": len(next(iter(samples.values()))), "samples": samples}
    if with_metric:
        side["metric"] = METRIC[task]
    return side


def report(with_metric: bool = True) -> dict[str, Any]:
    tasks = {}
    for task, sides in SAMPLES.items():
        diff = paired_bootstrap(_per_problem(sides["base"]), _per_problem(sides["candidate"]), 500, 0)
        tasks[task] = {"base": _side(task, "base", with_metric), "candidate": _side(task, "candidate", with_metric),
                       "diff": diff}
    return {"settings": {"settings_hash": "s1"}, "tasks": tasks}


def test_the_known_samples_cover_both_cases() -> None:
    """The fixture itself: an accuracy interval that [0, 1] cuts, log-likelihood intervals wholly below 0."""
    xs = _per_problem(SAMPLES[ACC]["candidate"])
    assert statistics.fmean(xs) + Z * statistics.stdev(xs) / math.sqrt(len(xs)) > 1.0
    assert expected(ACC, "candidate")[2] == 1.0 and expected(ACC_GSM, "base") == (0.0, 0.0, 0.0)
    assert all(expected(t, w)[2] < 0 for t in LOGLIKS for w in ("base", "candidate"))


# -- the model card -----------------------------------------------------------------------------------
_SCORE = re.compile(r"(-?\d+\.\d+) \[(-?\d+\.\d+), (-?\d+\.\d+)\]")


def _row(table: str, task: str) -> str:
    rows = [line for line in table.splitlines() if line.startswith(f"| {task} |")]
    assert len(rows) == 1, (task, table)
    return rows[0]


def _check_scores(row: str, task: str) -> None:
    """The row's base and candidate cells: ``mean [low, high]`` as computed here."""
    found = [tuple(float(x) for x in m) for m in _SCORE.findall(row)]
    assert len(found) == 2, row
    for who, (mean, low, high) in zip(("base", "candidate"), found, strict=True):
        want = expected(task, who)
        # to the printed precision (the ends have 3 or 4 decimals)
        assert (mean, low, high) == pytest.approx(want, abs=6e-4), (task, who, row)
        assert low <= mean <= high
        if task in ACCURACIES:
            assert 0.0 <= low and high <= 1.0
        else:  # not clamped: both ends below zero, around the mean
            assert low < mean < high < 0.0


@pytest.mark.parametrize("with_metric", [True, False], ids=["metric-recorded", "task-names-only"])
def test_the_card_shows_intervals_bounded_for_accuracies_and_unbounded_for_log_likelihoods(
    with_metric: bool,
) -> None:
    card = model_card({"content_hash": "abc"}, report(with_metric), {}, {}, {}, None, "m")
    for task in SAMPLES:
        _check_scores(_row(card, task), task)
    assert "[0.000, -" not in card and "[0.0000, -" not in card  # the clamped form
    diff = report()["tasks"][LL]["diff"]
    assert f"[{diff['ci_low']:+.4f}, {diff['ci_high']:+.4f}]" in _row(card, LL)


def test_the_prefect_table_shows_the_same_intervals() -> None:
    table = eval_table(report())
    for task in SAMPLES:
        _check_scores(_row(table, task), task)


# -- the plot -------------------------------------------------------------------------------------------
@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Any, Path]:
    """(the figure plot_eval saved, the PNG) for report()."""
    from matplotlib.figure import Figure

    saved: list[Figure] = []
    original = Figure.savefig

    def keep(self: Figure, *args: Any, **kwargs: Any) -> None:
        saved.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    path = plot_eval(report(), tmp_path / "eval.png")
    assert len(saved) == 1
    return saved[0], path


def _errorbars(ax: Any) -> list[tuple[str, list[tuple[float, float, float, float]]]]:
    """(label, [(y, x, x_low_end, x_high_end)]) of each horizontal error-bar series on ``ax``."""
    from matplotlib.container import ErrorbarContainer

    out = []
    for c in ax.containers:
        if not isinstance(c, ErrorbarContainer):
            continue
        line, _, bars = c.lines
        assert line is not None and bars, f"error bars on {ax.get_title()!r} drawn without their points"
        xs, ys = line.get_xdata(), line.get_ydata()
        segs = bars[0].get_segments()
        assert len(segs) == len(xs)
        points = []
        for x, y, seg in zip(xs, ys, segs, strict=True):
            (x0, y0), (x1, y1) = seg
            assert y0 == pytest.approx(y1)  # horizontal: the score runs along x, the tasks down y
            points.append((float(y), float(x), float(min(x0, x1)), float(max(x0, x1))))
        out.append((str(c.get_label()), points))
    return out


def _task_at(ax: Any, y: float) -> str:
    ticks = {round(float(t)): label.get_text() for t, label in zip(ax.get_yticks(), ax.get_yticklabels(),
                                                                     strict=True)}
    return ticks[round(y)]


def test_the_plot_draws_two_sided_intervals_with_accuracy_and_log_likelihood_apart(drawn: tuple[Any, Path]) -> None:
    fig, path = drawn
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    score_axes = [ax for ax in fig.axes if {lbl for lbl, _ in _errorbars(ax)} == {"base", "candidate"}]
    assert len(score_axes) == 2, [ax.get_title() for ax in fig.axes]
    kinds = {}
    for ax in score_axes:
        tasks = set()
        for who, points in _errorbars(ax):
            for y, x, low, high in points:
                task = _task_at(ax, y)
                tasks.add(task)
                mean, want_low, want_high = expected(task, who)
                assert (x, low, high) == pytest.approx((mean, want_low, want_high), abs=1e-9), (task, who)
                if task in LOGLIKS:  # two-sided around the mean, nothing cut at 0
                    assert low < x < high < 0.0
        kinds[ax.get_title()] = tasks
    # one axis per kind of score: the accuracies on one, the log-likelihoods on the other
    assert sorted(map(sorted, kinds.values())) == sorted([sorted(ACCURACIES), sorted(LOGLIKS)])
    acc_ax = next(ax for ax in score_axes if ACC in {t.get_text() for t in ax.get_yticklabels()})
    low, high = acc_ax.get_xlim()
    assert -0.1 <= low <= 0.0 and 1.0 <= high <= 1.1
    # the candidate - base panels: the paired bootstrap's interval of each task
    diffs = report()["tasks"]
    gains = [ax for ax in fig.axes if ax not in score_axes and _errorbars(ax)]
    seen = set()
    for ax in gains:
        partner = next(s for s in score_axes if s.get_subplotspec().rowspan == ax.get_subplotspec().rowspan)
        for _, points in _errorbars(ax):
            for y, x, low, high in points:
                task = _task_at(partner, y)
                d = diffs[task]["diff"]
                assert (x, low, high) == pytest.approx((d["mean_diff"], d["ci_low"], d["ci_high"]), abs=1e-9)
                seen.add(task)
    assert seen == set(SAMPLES)


def test_the_plot_labels_do_not_overlap(drawn: tuple[Any, Path]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig, _ = drawn
    canvas = FigureCanvasAgg(fig)  # plot_eval closed the figure: draw it again as the PNG was drawn
    canvas.draw()
    renderer = canvas.get_renderer()
    whole = fig.bbox
    for ax in fig.axes:
        for labels, at, (lo, hi) in ((ax.get_xticklabels(), 0, ax.get_xlim()), (ax.get_yticklabels(), 1, ax.get_ylim())):
            # the labels drawn: ticks outside the view keep a label that is not drawn
            shown = [t for t in labels if t.get_visible() and t.get_text()
                     and min(lo, hi) - 1e-9 <= t.get_position()[at] <= max(lo, hi) + 1e-9]
            boxes = [t.get_window_extent(renderer) for t in shown]
            for i, a in enumerate(boxes):
                assert whole.x0 - 1 <= a.x0 and a.x1 <= whole.x1 + 1, "a label runs off the figure"
                assert not any(a.overlaps(b) for b in boxes[i + 1:]), f"overlapping labels on {ax.get_title()!r}"
    names = {t.get_text() for ax in fig.axes for t in ax.get_yticklabels()}
    assert set(SAMPLES) <= names


# -- the settings the card lists ---------------------------------------------------------------------
def _fake_project(root: Path, base: str, content_hash: str) -> None:
    """What register reads: reports and a candidate folder (register copies the adapter, never loads it)."""
    reports = root / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "eval.json").write_text(json.dumps(report()))
    (reports / "train.json").write_text(json.dumps({"final_loss": 0.5, "steps": 3}))
    (reports / "train_curve.csv").write_text("step,loss\n1,0.9\n2,0.7\n")
    cand = root / "models" / "candidate"
    cand.mkdir(parents=True, exist_ok=True)
    (cand / "adapter_config.json").write_text("{}")
    (cand / "adapter_model.safetensors").write_bytes(content_hash.encode())
    (cand / "opsd_candidate.json").write_text(json.dumps(
        {"base_model": base, "adapter": True, "content_hash": content_hash, "params_hash": "p", "data_hash": "d"}))


def _model_section(card: str) -> list[str]:
    lines = card.splitlines()
    start = lines.index("- **model**") + 1
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("  "))
    return lines[start:end]


def test_the_registered_card_lists_the_tiny_model_settings_only_for_the_tiny_base(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from opsd_core.registry.store import open_client, resolve_store
    from opsd_core.stages.register import register

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("OPSD_MLFLOW_RUN_ID", raising=False)
    cards = {}
    for base, content in (("bundled:smollm2-135m-instruct", "a" * 64), ("tiny", "b" * 64)):
        params = Params(model={"base": base}, eval={"bootstrap_samples": 200})
        _fake_project(tmp_path, base, content)
        run_id = register(params, tmp_path)["run_id"]
        client = open_client(resolve_store(params, tmp_path))
        dst = tmp_path / f"dl-{content[0]}"
        dst.mkdir()
        cards[base] = _model_section(Path(client.download_artifacts(run_id, "model_card.md", str(dst))).read_text())
    smol, tiny = cards["bundled:smollm2-135m-instruct"], cards["tiny"]
    assert "  - base: `bundled:smollm2-135m-instruct`" in smol and "  - base: `tiny`" in tiny
    assert "  - tiny" not in smol and not any(line.startswith("    - hidden:") for line in smol)
    assert "  - tiny" in tiny and f"    - hidden: `{Params().model.tiny.hidden}`" in tiny
