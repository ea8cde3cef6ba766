"""Does OPSD move the student towards the verified solutions? Train variants of a profile and measure.

For each variant (a name and ``--set`` overrides), ``opsd train`` runs in-process on a prepared project
and the candidate is scored on the val split by what the evaluation's log-likelihood tasks measure,
computed directly with transformers (``tests/test_evaluation.py`` checks the two agree): per problem,
the mean log-probability per token of the verified solution behind exactly the student's prompt
(``solution``), and of its final answer line behind the prompt and the rest of the solution
(``answer``). Each is compared with the base by a paired bootstrap over problems.

    python -m benchmarks.opsd_sweep --project DIR [--profile P] [--set k=v ...] \\
        --variant 'clip-none:opsd.clip=none' --variant 'shuffled:opsd.teacher_context=shuffled' ...

A variant may also set ``@instruction=plain|bare``, short for ``opsd.teacher_instruction``: the teacher's
instruction after the reference solution becomes "A verified reference solution is given between the
tags above." (``plain``: no "do not copy it ... in your own words") or nothing (``bare``).

``DIR`` is a project after ``opsd data generate`` and ``opsd prepare``; candidates and reports go to
``DIR/sweep/<variant>``; results are printed as a table and written to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from opsd_core.algorithm.prompts import student_prompt_ids
from opsd_core.backends.capabilities import apply_isa_cap
from opsd_core.config import Params, load_params
from opsd_core.evaluation.bootstrap import paired_bootstrap
from opsd_core.evaluation.tasks import answer_split
from opsd_core.models.sources import load_candidate, load_model_and_tokenizer, resolve_base_dir
from opsd_core.offline import apply_offline_defaults
from opsd_core.registry.card import read_curve


@torch.no_grad()
def score(model: Any, tok: Any, rows: list[dict[str, Any]], thinking: bool | None) -> dict[str, list[float]]:
    """Per problem: mean log-probability per token of the solution and of its answer line."""
    out: dict[str, list[float]] = {"solution": [], "answer": []}
    model.eval()
    for row in rows:
        prompt = student_prompt_ids(tok, row["problem"], thinking)
        head, line = answer_split(row["solution"])
        head_ids = tok(head, add_special_tokens=False)["input_ids"] if head else []
        whole = tok(head + line, add_special_tokens=False)["input_ids"]
        if whole[:len(head_ids)] != head_ids:  # a token across the cut: score the line as tokenized alone
            whole = head_ids + tok(line, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + whole])
        logp = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)
        token_lp = logp.gather(1, torch.tensor(whole)[:, None])[:, 0]
        out["solution"].append(float(token_lp.mean()))
        out["answer"].append(float(token_lp[len(head_ids):].mean()))
    return out


def compare(base: dict[str, list[float]], cand: dict[str, list[float]], seed: int) -> dict[str, Any]:
    result = {}
    for key in base:
        boot = paired_bootstrap(base[key], cand[key], n=2000, seed=seed)
        improved = sum(c > b for b, c in zip(base[key], cand[key], strict=True))
        result[key] = {"base": sum(base[key]) / len(base[key]), "candidate": sum(cand[key]) / len(cand[key]),
                       "diff": boot["mean_diff"], "ci": [boot["ci_low"], boot["ci_high"]],
                       "improved": improved, "problems": len(base[key])}
    return result


INSTRUCTIONS = {"plain": "A verified reference solution is given between the tags above.", "bare": ""}


def run_variant(root: Path, params: Params, rows: list[dict[str, Any]], base_scores: dict[str, list[float]],
                name: str) -> dict[str, Any]:
    from opsd_core.stages.train import train

    started = time.perf_counter()
    summary = train(params, root)
    assert summary is not None
    base_dir = resolve_base_dir(params.model, root)
    model, tok = load_candidate(base_dir, root / params.train.output_dir)
    cand = score(model, tok, rows, params.model.thinking)
    curve = read_curve(root / params.train.reports_dir / "train_curve.csv")
    return {"variant": name, "wall_s": time.perf_counter() - started, "first_loss": summary["first_loss"],
            "final_loss": summary["final_loss"], "clipped_frac": [r.get("clipped_frac") for r in curve],
            "kl": [r.get("kl") for r in curve], **compare(base_scores, cand, params.train.seed)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--project", type=Path, required=True)
    ap.add_argument("--profile", default=None)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="applies to every variant")
    ap.add_argument("--variant", action="append", default=[], help="NAME[:k=v,k=v...]")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    apply_isa_cap()  # OPSD_CPU_ISA's caps before torch runs a kernel
    apply_offline_defaults()
    root = args.project.resolve()
    common = load_params(root / "params.yaml", args.profile, args.sets)
    torch.set_num_threads(common.train.threads or torch.get_num_threads())
    rows = [json.loads(line) for line in (root / common.data.prepared_dir / "val.jsonl").read_text().splitlines()
            if line.strip()]
    base_model, tok = load_model_and_tokenizer(common.model, root)
    base_scores = score(base_model, tok, rows, common.model.thinking)
    del base_model
    results = []
    for spec in args.variant or ["default"]:
        name, _, sets = spec.partition(":")
        items = [s for s in sets.split(",") if s]
        items = [f"opsd.teacher_instruction={INSTRUCTIONS[s.split('=', 1)[1]]}" if s.startswith("@instruction=")
                 else s for s in items]
        overrides = [*args.sets, *items,
                     f"train.output_dir=sweep/{name}/candidate", f"train.reports_dir=sweep/{name}/reports",
                     # its own checkpoints: the teacher's instruction is not part of the run key, and a
                     # finished training removes other run keys' checkpoints
                     f"train.checkpoint_dir=sweep/{name}/checkpoints"]
        params = load_params(root / "params.yaml", args.profile, overrides)
        shutil.rmtree(root / params.train.checkpoint_dir, ignore_errors=True)  # train from scratch, always
        res = run_variant(root, params, rows, base_scores, name)
        res["overrides"] = overrides[:len(overrides) - 3]
        results.append(res)
        s, a = res["solution"], res["answer"]
        print(f"{name:24s} solution {s['diff']:+.4f} [{s['ci'][0]:+.4f}, {s['ci'][1]:+.4f}] {s['improved']}/"
              f"{s['problems']}  answer {a['diff']:+.4f} [{a['ci'][0]:+.4f}, {a['ci'][1]:+.4f}] {a['improved']}/"
              f"{a['problems']}  clipped {res['clipped_frac'][0]:.2f}  {res['wall_s']:.0f} s", flush=True)
        if args.out:
            args.out.write_text(json.dumps({"base": {k: sum(v) / len(v) for k, v in base_scores.items()},
                                            "results": results}, indent=1))


if __name__ == "__main__":
    main()
