"""Does OPSD help where the self-teacher gap is real? SFT, then OPSD and its controls, on generated arithmetic.

For each difficulty and seed: generate training problems and a disjoint test split (no choice looks at it),
train the arms with ``opsd train`` in-process (each in its own project folder), and score every model's
greedy answers on the test split through the project's own sampler (strict ``#### N`` and flexible last
number), each arm against its reference by a paired bootstrap over problems. Arms:

* ``base``: no training. ``sft``: SFT on the verified traces (the model the after-SFT arms start from).
* ``opsd_after_sft``, ``shuffled_after_sft`` (the teacher sees another problem's solution: the control),
  ``contrast_after_sft`` (``opsd.contrast: shuffled``), ``more_sft`` (SFT continued for the same steps and
  problems as the OPSD round): each from the SFT model, compared with it.
* ``opsd_from_base``: from the base, compared with it. ``mix`` (``train.objective: mix``): from the base for
  SFT's steps, compared with ``sft`` (the same steps from the same base without the OPSD term: what it adds).

    python -m benchmarks.opsd_study --out benchmarks/results/DATE-opsd-study.json \\
        [--model bundled|tiny] [--seeds 0 1 2] [--difficulty 2:50:0 ...] [--arms ...] [--work DIR] [--threads N]
    python -m benchmarks.opsd_study --out ALL.json --merge SEED0.json SEED1.json ...   # cells run side by side

Every run's settings are in the results file (``settings`` and each run's ``set``), so a row can be rerun
with ``opsd train --set ...`` on the same data.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from opsd_core.algorithm.prompts import student_prompt_ids
from opsd_core.algorithm.rollout import eos_token_ids, sample
from opsd_core.backends.capabilities import apply_isa_cap
from opsd_core.config import Params, load_params
from opsd_core.data.arithmetic import ArithmeticDifficulty, arithmetic_rows
from opsd_core.evaluation.bootstrap import paired_bootstrap
from opsd_core.evaluation.metrics import flexible_correctness, sample_correctness
from opsd_core.io import atomic_write
from opsd_core.models.sources import load_candidate, load_model_and_tokenizer, resolve_base_dir
from opsd_core.offline import apply_offline_defaults
from opsd_core.stages.train import build_backend, execution_plan, train

ROOT = Path(__file__).resolve().parents[1]
AFTER_SFT = ("opsd_after_sft", "shuffled_after_sft", "contrast_after_sft", "more_sft")
ARMS = ("base", "sft", *AFTER_SFT, "opsd_from_base", "mix")
# what each arm's gain is measured against
REFERENCE: dict[str, str] = {"sft": "base", **dict.fromkeys(AFTER_SFT, "sft"), "opsd_from_base": "base", "mix": "sft"}
# each arm's settings on top of the round's (opsd train --set)
ARM_SETTINGS: dict[str, list[str]] = {
    "opsd_after_sft": [],
    "shuffled_after_sft": ["opsd.teacher_context=shuffled"],
    "contrast_after_sft": ["opsd.contrast=shuffled"],
    "more_sft": ["train.objective=sft"],
    "opsd_from_base": [],
    "mix": ["train.objective=mix"],
}
CHECKPOINT_EVERY = 8  # a mix arm trains ~1 h on one core: a killed study loses at most 8 steps of it
SIZES = {  # model -> (train problems, test problems, SFT steps, OPSD-round steps, rollouts per step)
    "bundled": (256, 200, 64, 30, 8),
    "tiny": (24, 16, 4, 3, 4),
}


def _params(model: str, work: Path, seed: int, extra: list[str]) -> Params:
    profile = "smoke" if model == "tiny" else "default"
    base = [] if model == "tiny" else ["model.base=bundled:smollm2-135m-instruct"]
    return load_params(ROOT / "params.yaml", profile, [
        f"model.cache_dir={ROOT / '.opsd/models' if model != 'tiny' else work / 'models'}", *base,
        f"train.seed={seed}", "train.warmup_steps=2", f"train.checkpoint_every={CHECKPOINT_EVERY}",
        "opsd.sampling.max_new_tokens=64", "opsd.diagnose_problems=32", "train.progress=false", *extra])


def arm_project(folder: Path, train_rows: list[Any]) -> Path:
    """An arm's project folder. One left by a killed run on the same problems is kept: its checkpoints (every
    ``CHECKPOINT_EVERY`` steps, keyed by the run's params and data) resume the arm instead of restarting it."""
    data = folder / "data/prepared/train.jsonl"
    text = "".join(r.to_json_line() for r in train_rows)
    if not (data.is_file() and data.read_text() == text):
        shutil.rmtree(folder, ignore_errors=True)
        data.parent.mkdir(parents=True)
        data.write_text(text)
    return folder


def _merged(project: Path, params: Params, out: Path) -> Path:
    """The trained candidate with its adapter merged: a plain model folder the next round starts from."""
    model, tok = load_candidate(resolve_base_dir(params.model, project), project / params.train.output_dir)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@torch.no_grad()
def greedy_scores(params: Params, model_dir: str, rows: list[Any], batch: int = 32) -> dict[str, list[float]]:
    """Per test problem: 1.0 if the greedy answer is right (strict: ``#### N``; flex: the last number)."""
    cfg = params.model_copy(update={"model": params.model.model_copy(update={"base": model_dir})}, deep=True)
    cfg.lora.enabled = False
    plan = execution_plan(cfg, world_size=1)
    model, tok = load_model_and_tokenizer(cfg.model, ROOT)
    device = torch.device(plan.device)
    module = build_backend(cfg, model.to(device), plan, device, lambda _m: None).sampling_module()
    greedy = cfg.opsd.sampling.model_copy(update={"top_k": 1, "min_new_tokens": 0})
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out: dict[str, list[float]] = {"strict": [], "flex": []}
    for lo in range(0, len(rows), batch):
        part = rows[lo:lo + batch]
        prompts = [student_prompt_ids(tok, r.problem, cfg.model.thinking) for r in part]
        got = sample(module, prompts, greedy, pad, eos_token_ids(model, tok), [lo + i for i in range(len(part))], device)
        for r, ids, mask in zip(part, got.completion_ids, got.completion_mask, strict=True):
            text = tok.decode(ids[mask].tolist(), skip_special_tokens=True)
            # the evaluation's own scoring: the same answer rules as opsd evaluate's exact-match tasks
            doc = {"answer": r.answer}
            out["strict"].append(float(sample_correctness(doc, [text])[0]))
            out["flex"].append(float(flexible_correctness(doc, [text])[0]))
    return out


def _base_scores(path: Path, rows: list[Any], score: Callable[[list[Any]], dict[str, list[float]]]
                 ) -> dict[str, list[float]]:
    """The base model's scores on ``rows``, through a per-difficulty cache keyed by problem text: the base is
    the same model in every seed, and the seeds' test splits differ only by the problems each training set holds."""
    cache: dict[str, list[float]] = json.loads(path.read_text()) if path.is_file() else {}
    missing = [r for r in rows if r.problem not in cache]
    got = score(missing)
    cache.update({r.problem: [s, f] for r, s, f in zip(missing, got["strict"], got["flex"], strict=True)})
    if missing:
        atomic_write(path, json.dumps(cache))
    return {"strict": [cache[r.problem][0] for r in rows], "flex": [cache[r.problem][1] for r in rows]}


def _compare(ref: dict[str, list[float]], cand: dict[str, list[float]], seed: int) -> dict[str, Any]:
    return {k: paired_bootstrap(ref[k], cand[k], 2000, seed) for k in ("strict", "flex")}


def split_rows(model: str, difficulty: ArithmeticDifficulty, seed: int) -> tuple[list[Any], list[Any]]:
    """(training problems drawn by ``seed``, the test split: one fixed draw for every seed, minus any problem
    the training set holds)."""
    n_train, n_test = SIZES[model][:2]
    train_rows = arithmetic_rows(n_train, 1000 + seed, difficulty)
    seen = {r.problem for r in train_rows}
    return train_rows, [r for r in arithmetic_rows(n_test + n_train, 5000, difficulty) if r.problem not in seen][:n_test]


def run_cell(model: str, difficulty: ArithmeticDifficulty, seed: int, arms: list[str], work: Path,
             threads: int | None = None) -> dict[str, Any]:
    """One difficulty and seed: every arm trained, scored and compared (``threads``: torch threads per process,
    so that cells can run side by side, one per core)."""
    _, _, sft_steps, round_steps, rollouts = SIZES[model]
    work = work.resolve()  # model paths in the settings are absolute: the models load from another folder
    train_rows, test_rows = split_rows(model, difficulty, seed)
    cell = work / f"{difficulty.label}-seed{seed}"
    sizing = [f"train.rollouts_per_step={rollouts}", f"train.micro_batch_size={rollouts // 2}",
              *([f"train.threads={threads}"] if threads else [])]
    runs: dict[str, dict[str, Any]] = {}
    base_params = _params(model, cell, seed, sizing)
    base_dir = resolve_base_dir(base_params.model, ROOT)

    def trained(name: str, start: str, steps: int, extra: list[str]) -> tuple[Params, Path]:
        settings = [*sizing, f"model.base={start}", f"train.steps={steps}", *extra]
        params = _params(model, cell, seed, settings)
        project = arm_project(cell / name, train_rows)
        began = time.perf_counter()
        summary = train(params, project)
        assert summary is not None
        runs[name] = {"set": settings, "train_s": time.perf_counter() - began, "diagnosis": summary.get("diagnosis"),
                      "first_loss": summary["first_loss"], "final_loss": summary["final_loss"]}
        return params, project

    def scored(arm: str, params: Params, model_dir: str) -> dict[str, list[float]]:
        began = time.perf_counter()
        got = greedy_scores(params, model_dir, test_rows)
        # one line per arm as it lands: a long study shows its results before it ends
        print(f"{difficulty.label} seed {seed} {arm}: strict {sum(got['strict'])}/{len(test_rows)}, flex "
              f"{sum(got['flex'])}/{len(test_rows)} (scored in {time.perf_counter() - began:.0f} s)", flush=True)
        return got

    def scored_rows(rows: list[Any]) -> dict[str, list[float]]:
        print(f"{difficulty.label} seed {seed} base: scoring {len(rows)} problems not in the cache", flush=True)
        return greedy_scores(base_params, base_dir, rows) if rows else {"strict": [], "flex": []}

    scores: dict[str, dict[str, list[float]]] = {
        "base": _base_scores(work / f"{difficulty.label}-base.json", test_rows, scored_rows)}
    runs["base"] = {"set": []}

    def done(arm: str, settings: list[str]) -> bool:
        """An arm this cell already trained and scored with the same settings (a study resumes where it stopped)."""
        record = cell / f"{arm}.result.json"
        if not record.is_file():
            return False
        saved = json.loads(record.read_text())
        if saved["run"]["set"] != settings:
            return False
        runs[arm], scores[arm] = saved["run"], saved["scores"]
        print(f"{difficulty.label} seed {seed} {arm}: reused {record}", flush=True)
        return True

    def keep(arm: str) -> None:
        atomic_write(cell / f"{arm}.result.json", json.dumps({"run": runs[arm], "scores": scores[arm]}))

    sft_dir = None
    if any(a == "sft" or REFERENCE.get(a) == "sft" for a in arms):
        sft_settings = [*sizing, f"model.base={base_dir}", f"train.steps={sft_steps}", "train.objective=sft",
                        "train.lr=2e-4"]
        sft_dir = str(cell / "sft-model")
        if not ((cell / "sft-model/config.json").is_file() and done("sft", sft_settings)):
            params, project = trained("sft", base_dir, sft_steps, ["train.objective=sft", "train.lr=2e-4"])
            sft_dir = str(_merged(project, params, cell / "sft-model"))
            scores["sft"] = scored("sft", params, sft_dir)
            keep("sft")
    for arm in arms:
        if arm in ("base", "sft"):
            continue
        start = sft_dir if arm in AFTER_SFT else base_dir
        assert start is not None
        steps = round_steps if arm != "mix" else sft_steps
        lr = "train.lr=1e-4" if arm != "mix" else "train.lr=2e-4"  # the round's rate; mix trains as long as SFT
        extra = [lr, *ARM_SETTINGS[arm]]
        if done(arm, [*sizing, f"model.base={start}", f"train.steps={steps}", *extra]):
            continue
        params, project = trained(arm, start, steps, extra)
        scores[arm] = scored(arm, params, str(_merged(project, params, cell / f"{arm}-model")))
        keep(arm)
        shutil.rmtree(cell / f"{arm}-model", ignore_errors=True)
    for arm, got in scores.items():
        ref = REFERENCE.get(arm, "base")
        runs[arm].update({k: sum(v) / len(v) for k, v in got.items()})
        if arm != "base":
            runs[arm]["vs"] = ref
            runs[arm]["gain"] = _compare(scores[ref], got, seed)
    return {"difficulty": difficulty.label, "seed": seed, "test_problems": len(test_rows),
            "train_problems": len(train_rows), "runs": runs}


def table(cells: list[dict[str, Any]]) -> str:
    lines = ["| difficulty | seed | arm | strict | flex | vs | flex gain [95% CI] | gap before training |",
             "|---|---|---|---|---|---|---|---|"]
    for cell in cells:
        for arm, run in cell["runs"].items():
            gain = run.get("gain", {}).get("flex")
            interval = f"{gain['mean_diff']:+.3f} [{gain['ci_low']:+.3f}, {gain['ci_high']:+.3f}]" if gain else ""
            gap = (run.get("diagnosis") or {}).get("accuracy_gap")
            lines.append(f"| {cell['difficulty']} | {cell['seed']} | {arm} | {run['strict']:.3f} | {run['flex']:.3f} "
                         f"| {run.get('vs', '')} | {interval} | {'' if gap is None else f'{gap:+.2f}'} |")
    return "\n".join(lines)


def _arm_rows(cells: list[dict[str, Any]]) -> Iterator[tuple[str, str, dict[int, dict[str, Any]], list[dict[str, Any]]]]:
    """Per difficulty and arm (``ARMS`` order, then any other arm): the arm's run for each seed that has it, and
    the flexible gains over its reference."""
    for difficulty in dict.fromkeys(c["difficulty"] for c in cells):
        mine = {c["seed"]: c for c in cells if c["difficulty"] == difficulty}
        present = dict.fromkeys(a for c in mine.values() for a in c["runs"])
        for arm in [*(a for a in ARMS if a in present), *(a for a in present if a not in ARMS)]:
            runs = {s: c["runs"][arm] for s, c in sorted(mine.items()) if arm in c["runs"]}
            yield difficulty, arm, runs, [r["gain"]["flex"] for r in runs.values() if "gain" in r]


def across_seeds(cells: list[dict[str, Any]], points: bool = False, seeds: tuple[int, ...] = (0, 1, 2)) -> str:
    """Per difficulty and arm: the mean flexible accuracy over seeds, each seed's gain over the arm's reference
    with its 95% CI, and how many seeds' intervals lie above zero. ``points`` gives docs/opsd-study.md's form:
    difficulty as ``steps:max_number:distractors``, gains in points, a column per seed of ``seeds`` (a seed
    without the arm says so) and ``all < 0`` when every interval lies below zero."""
    if points:
        lines = [f"| difficulty | arm | vs | mean flex | gain per seed (seeds {' / '.join(map(str, seeds))}) "
                 "[95% CI] | seeds with CI > 0 |", "|---|---|---|---|---|---|"]
    else:
        lines = ["| difficulty | arm | vs | seeds | mean flex | gain per seed [95% CI] | seeds with CI > 0 |",
                 "|---|---|---|---|---|---|---|"]
    scale, digits = (100, 1) if points else (1, 3)

    def shown(g: dict[str, Any]) -> str:
        low, mid, high = (f"{scale * g[k]:+.{digits}f}" for k in ("ci_low", "mean_diff", "ci_high"))
        return f"{mid} [{low}, {high}]"

    for difficulty, arm, runs, gains in _arm_rows(cells):
        if points:
            per_seed = "; ".join(shown(runs[s]["gain"]["flex"]) if s in runs else f"(seed {s} not run)"
                                 for s in seeds) if gains else ""
        else:
            per_seed = "; ".join(shown(g) for g in gains)
        above = f"{sum(g['ci_low'] > 0 for g in gains)}/{len(gains)}" if gains else ""
        if points and gains and all(g["ci_high"] < 0 for g in gains):
            above += ", all < 0"
        mean = f"{sum(r['flex'] for r in runs.values()) / len(runs):.3f}"
        vs = next(iter(runs.values())).get("vs", "")
        if points:
            label = ":".join(str(int(part[1:])) for part in difficulty.split("-"))  # s2-n50-d0 -> 2:50:0
            lines.append(f"| {label} | {arm} | {vs} | {mean} | {per_seed} | {above} |")
        else:
            lines.append(f"| {difficulty} | {arm} | {vs} | {len(runs)} | {mean} | {per_seed} | {above} |")
    return "\n".join(lines)


def merge(paths: list[Path], out: Path) -> str:
    """Several results files (e.g. one per seed, run side by side, or arms added to a cell later) into one,
    with both tables."""
    loaded = [json.loads(p.read_text()) for p in paths]
    # one cell run in parts (arms added later) is one cell: a later file's arm replaces an earlier one's
    by_key: dict[tuple[str, int], dict[str, Any]] = {}
    for cell in (c for r in loaded for c in r["cells"]):
        key = (cell["difficulty"], cell["seed"])
        if key in by_key:
            by_key[key]["runs"].update(cell["runs"])
        else:
            by_key[key] = {**cell, "runs": dict(cell["runs"])}
    cells = list(by_key.values())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": loaded[0]["model"], "sizes": loaded[0]["sizes"], "cells": cells}, indent=2))
    return table(cells) + "\n\n" + across_seeds(cells)


def main(argv: list[str] | None = None) -> int:
    apply_isa_cap()  # OPSD_CPU_ISA's caps before torch runs a kernel
    apply_offline_defaults()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", choices=sorted(SIZES), default="bundled")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--difficulty", nargs="+", default=["2:50:0"], help="steps:max_number:distractors")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--work", type=Path, default=ROOT / ".opsd/study")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: train.threads)")
    parser.add_argument("--merge", type=Path, nargs="+", help="only merge these results files into --out")
    parser.add_argument("--points", action="store_true", help="only print --out's table in points (the doc's)")
    args = parser.parse_args(argv)
    if args.merge:
        print(merge(args.merge, args.out))
        return 0
    if args.points:
        print(across_seeds(json.loads(args.out.read_text())["cells"], points=True))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)  # the base model is scored before any training sets it
    cells = []
    for spec in args.difficulty:
        steps, max_number, distractors = (int(x) for x in spec.split(":"))
        for seed in args.seeds:
            cells.append(run_cell(args.model, ArithmeticDifficulty(steps, max_number, distractors), seed, args.arms,
                                  args.work, args.threads))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"model": args.model, "sizes": SIZES[args.model], "cells": cells}, indent=2))
            print(table(cells[-1:]), flush=True)
    print(table(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
