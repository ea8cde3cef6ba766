"""The stage contract (opsd_core/layout.py) is the one dvc.yaml declares: every file a stage hands another is
named by the layout, and the layout's names are where the stages write."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from opsd_core.config import load_params
from opsd_core.layout import CHALLENGER, CHAMPION, Env, Layout

ROOT = Path(__file__).resolve().parents[1]


def _paths(entries: list[Any] | None) -> set[str]:
    """dvc.yaml lists a path as a string or as a one-key mapping (path -> options)."""
    out = set()
    for entry in entries or []:
        out.update([entry] if isinstance(entry, str) else entry)
    return out


def test_dvc_yaml_declares_the_layouts_files() -> None:
    layout = Layout.of(load_params(ROOT / "params.yaml"), ROOT)

    def rel(path: Path) -> str:
        return str(path.relative_to(ROOT))

    expected = {
        "prepare": ({"data/raw"}, {rel(layout.prepared), rel(layout.eval_data), rel(layout.data_report),
                                   rel(layout.rejected)}, {rel(layout.metrics("data"))}, set()),
        "train": ({rel(layout.train_split)}, {rel(layout.candidate), rel(layout.train_report)},
                  {rel(layout.metrics("train"))}, {rel(layout.training_plot)}),
        "evaluate_base": ({rel(layout.val_split), rel(layout.eval_data)}, {rel(layout.eval_base_report)}, set(),
                          set()),
        "evaluate": ({rel(layout.candidate), rel(layout.eval_base_report), rel(layout.val_split),
                      rel(layout.eval_data)}, {rel(layout.eval_report)}, {rel(layout.metrics("eval"))},
                     {rel(layout.eval_plot)}),
        "register": ({rel(layout.candidate), rel(layout.eval_report), rel(layout.train_report)},
                     {rel(layout.registry_report)}, {rel(layout.metrics("gate"))}, set()),
    }
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(stages) == list(expected)
    for name, (deps, outs, metrics, plots) in expected.items():
        stage = stages[name]
        got = (_paths(stage.get("deps")), _paths(stage.get("outs")), _paths(stage.get("metrics")),
               _paths(stage.get("plots")))
        assert got == (deps, outs, metrics, plots), name


def test_relative_settings_join_the_root_and_an_absolute_state_folder_stays(tmp_path: Path) -> None:
    params = load_params(ROOT / "params.yaml", overrides=[f"registry.state_dir={tmp_path / 'shared'}",
                                                          "train.reports_dir=out/reports"])
    layout = Layout.of(params, tmp_path / "clone")
    assert layout.state == (tmp_path / "shared").resolve()
    assert layout.eval_report == tmp_path / "clone" / "out" / "reports" / "eval.json"
    assert layout.metrics("train") == tmp_path / "clone" / "out" / "reports" / "metrics" / "train.json"


def test_the_vocabulary_is_distinct() -> None:
    names = [v for k, v in vars(Env).items() if not k.startswith("_")]
    assert len(names) == len(set(names)) and all(n.startswith("OPSD_") for n in names)
    assert CHAMPION != CHALLENGER
