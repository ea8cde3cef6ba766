"""Rollout sampling side by side: opsd's decoder engine vs transformers ``generate`` (dynamic cache, static
cache, static cache compiled) vs opsd's own ``static`` sampler (the static cache with opsd's per-row noise,
as training runs it), same model, batch, settings and token count, in one process.

``python -m benchmarks.static_generate [--model smollm2] [--batch 4[,256]] [--new-tokens 64]
[--dtype float32] [--repeats 3] [--threads 2] [--device cpu] [--no-compile] [--paths NAME;NAME]``

Every row is forced to ``--new-tokens`` tokens (end-of-sequence suppressed), so the paths decode the
same number of tokens. Each path is called once untimed first (the compiled paths compile there; that
time is printed apart), then ``--repeats`` timed calls; the median is shown. The question it answers
(issue 12): is transformers' own static-cache path, compiled, as fast as the engine, on this device, and
what does opsd's per-row noise cost on top of it?
"""

from __future__ import annotations

import argparse
import copy
import os
from collections.abc import Callable
from typing import Any

from benchmarks.common import MODEL_CACHE, OFFLINE_ENV, model_source, set_threads, timed_calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch", default="4", help="rollouts per call; a comma list runs each in turn")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled static-cache row")
    parser.add_argument("--paths", default=None, help="only these paths, by name, separated by ';'")
    args = parser.parse_args(argv)
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    set_threads(args.threads)
    spec = {"model": args.model, "batches": [int(b) for b in str(args.batch).split(",")],
            "new_tokens": args.new_tokens, "dtype": args.dtype, "repeats": args.repeats, "threads": args.threads,
            "device": args.device, "compile": not args.no_compile,
            "paths": args.paths.split(";") if args.paths else None}
    measure(spec, report=print)
    return 0


def measure(spec: dict[str, Any], report: Callable[[str], None] = lambda _line: None) -> dict[str, Any]:
    """Every path at every batch size of ``spec`` (the CLI's options; ``batches`` a list, ``compile`` a
    bool): ``{"engine_packs": ..., "batches": {batch: {path: {"tok_s", "seconds", "first_call_s"}}}}``.
    ``report`` gets a line per path as it is timed (the CLI prints them)."""
    import torch

    from opsd_core.backends.capabilities import probe
    from opsd_core.backends.engine import DecoderEngine
    from opsd_core.backends.packs import for_plan
    from opsd_core.backends.plan import make_plan
    from opsd_core.backends.sampler import PolicySampler
    from opsd_core.config import ModelConfig, Params
    from opsd_core.models.sources import load_model_and_tokenizer

    dev = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    model, tok = load_model_and_tokenizer(ModelConfig(base=model_source(spec["model"]), cache_dir=str(MODEL_CACHE)),
                                          dtype=dtype)
    model = model.to(dev).eval().requires_grad_(False)
    # the engine as training builds it: with the oneDNN packs this machine's plan chooses (CPU)
    plan = make_plan(Params.model_validate({"train": {"device": dev.type}}), probe())
    packs = for_plan(plan, frozen_dtype=False) if dev.type == "cpu" else None
    wanted = spec.get("paths")  # a subset of the paths by name (the GPU suites'); None: every path
    engine = DecoderEngine(copy.deepcopy(model), packs=packs) if not wanted or "opsd engine" in wanted else None
    static = PolicySampler(model, dtype, "static")  # opsd's own sampling copy, as training builds it
    out: dict[str, Any] = {"engine_packs": plan.packs if packs is not None else "off", "batches": {}}
    n = spec["new_tokens"]
    for batch in spec["batches"]:
        report(f"{spec['model']} {spec['dtype']} on {dev}: batch {batch} x {n} new tokens, {spec['threads']} "
               f"threads, median of {spec['repeats']}; engine packs: {out['engine_packs']}")
        rows = out["batches"][batch] = {}
        paths = _paths(dev, n, spec["compile"], batch, model, tok, engine, static)
        if wanted:
            unknown = set(wanted) - set(paths) - ({"generate, static cache, compiled"} if not spec["compile"] else set())
            if unknown:
                raise ValueError(f"unknown sampling paths {sorted(unknown)}; known: {sorted(paths)}")
            paths = {name: fn for name, fn in paths.items() if name in wanted}
        for name, fn in paths.items():
            rows[name] = _time(fn, batch * n, spec["repeats"], dev)
            report(f"{name:36s} {rows[name]['tok_s']:9.1f} tok/s  ({rows[name]['seconds']:.3f} s; "
                   f"first call {rows[name]['first_call_s']:.1f} s)")
    return out


def _paths(dev: Any, n: int, compile_: bool, batch: int, model: Any, tok: Any, engine: Any, static: Any
           ) -> dict[str, Callable[[], object]]:
    from transformers import CompileConfig

    from opsd_core.algorithm.prompts import student_prompt_ids
    from opsd_core.algorithm.rollout import left_pad, sample
    from opsd_core.config import SamplingConfig

    questions = [f"Tom has {3 + i} apples and buys {4 * i + 1} more. How many does he have?" for i in range(batch)]
    prompts = [student_prompt_ids(tok, q) for q in questions]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids, attn = (t.to(dev) for t in left_pad(prompts, pad))  # left padding, as opsd's generate paths do
    sampling = {"do_sample": True, "temperature": 1.1, "top_k": 20, "top_p": 0.95, "max_new_tokens": n,
                "min_new_tokens": n, "pad_token_id": pad}
    cfg = SamplingConfig(max_new_tokens=n, min_new_tokens=n, temperature=1.1, top_k=20, top_p=0.95)
    nucleus = cfg.model_copy(update={"top_k": 0})  # top_k 0: the draw over the top-p nucleus alone

    def hf(**extra: object) -> Callable[[], object]:
        return lambda: model.generate(input_ids=ids, attention_mask=attn, **sampling, **extra)

    paths: dict[str, Callable[[], object]] = {
        "opsd engine": lambda: engine.generate(prompts, n, temperature=1.1, top_k=20, top_p=0.95, eos_ids=set(),
                                               pad_id=pad, row_seeds=list(range(len(prompts)))),
        "generate, dynamic cache": hf(),
        "generate, static cache (eager)": hf(cache_implementation="static", disable_compile=True),
        # what `opsd train` runs with opsd.sampling.backend static (the GPU default): transformers' static
        # cache, compiled by transformers on a GPU (eager elsewhere), plus opsd's per-row noise
        "opsd static sampler (row noise)": lambda: sample(static.module(), prompts, cfg, pad, set(),
                                                          list(range(len(prompts))), dev,
                                                          options=static.generate_options),
        "opsd static sampler, top_k 0 (nucleus)": lambda: sample(static.module(), prompts, nucleus, pad, set(),
                                                                 list(range(len(prompts))), dev,
                                                                 options=static.generate_options),
    }
    if compile_:
        compile_config = CompileConfig(mode="reduce-overhead" if dev.type == "cuda" else "default")
        compile_config._compile_all_devices = True  # transformers compiles on accelerators only, unless told
        paths["generate, static cache, compiled"] = hf(cache_implementation="static", compile_config=compile_config)
    return paths


def _time(fn: Callable[[], object], tokens: int, repeats: int, dev: Any) -> dict[str, float]:
    first, sec = timed_calls(fn, repeats, dev.type)
    return {"tok_s": tokens / sec, "seconds": sec, "first_call_s": first}


if __name__ == "__main__":
    raise SystemExit(main())
