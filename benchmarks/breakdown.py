"""One training step taken apart: each piece of an opsd step timed alone, next to the same piece done TRL's way.

``python -m benchmarks.breakdown [--impl opsd|opsd_bf16s|opsd_fast (default: the fastest this CPU has)]
[--model smollm2] [--new-tokens 32] [--repeats 3] [--device cpu|cuda] [--precision float32|bfloat16]
[--profile] [--json OUT]``

Pieces are the trainer's own calls: ``OPSDTrainer.rollout`` (and the prompts' prefill alone), the
sampler sync, ``teacher.hidden``, the student's ``student_hidden`` + backward, ``chunked_divergence_loss``
forward + gradient, the whole ``accumulate`` and ``optimizer_step``. "TRL's way" is transformers on the
LoRA model in the training dtype: ``generate`` with the adapter unmerged, the teacher as one padded
batch with the adapter disabled, and the loss from full [B, L, V] logits. Medians of ``--repeats``
timings after one warm-up call each; on a GPU every timing waits for the device.

``--profile`` adds one whole step (rollout, accumulate, optimizer step) under ``torch.profiler``: its wall
time beside the time the device spent in kernels (on a GPU: a busy fraction far below 1 means the step
is bound by kernel launches and host syncs, not by the device), the number of kernel launches, and the
operators with the most device time (CPU time on a CPU). Kernels replayed from a CUDA graph are not
seen one by one, so a compiled sampler shows as a few graph launches.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from benchmarks.common import Clock, add_step_arguments, start_step_case, timed_calls

# the launch calls the CUDA runtime and driver report, one per kernel
_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(parser, ["opsd", "opsd_bf16s", "opsd_fast"], None, 4, 2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--profile", action="store_true", help="also one whole step under torch.profiler")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    spec = start_step_case(args)
    spec.update(device=args.device, precision=args.precision, repeats=args.repeats, profile=args.profile)
    result = measure(spec)
    print(f"{spec['impl']} on {args.model}: {args.rollouts} rollouts x {args.new_tokens} tokens, micro-batch "
          f"{args.micro_batch}, {args.threads} threads, {args.device} {args.precision}; median of {args.repeats}")
    for row in result["rows"]:
        print(f"{row['piece']:55s} {row['seconds']:7.3f} s  {row['how']}")
    if result.get("profile"):
        print(profile_text(result["profile"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """The pieces of step 0 of a step case ``spec`` (``benchmarks.step_opsd``'s keys, plus ``repeats`` and
    ``profile``): ``{"rows": [{"piece", "seconds", "how"}], "profile": {...} or None}``."""
    import torch

    from benchmarks.step_opsd import _setup, naive_token_kl, step_batches
    from opsd_core.algorithm.losses import chunked_divergence_loss
    from opsd_core.algorithm.rollout import sample
    from opsd_core.algorithm.scoring import completion_hidden, lm_head
    from opsd_core.stages.train import build_trainer

    clock = Clock(spec["device"])
    repeats = int(spec.get("repeats", 3))

    params, model, tok, problems, dev = _setup(spec)
    rows: list[dict[str, Any]] = []

    def add(piece: str, fn: Callable[[], object], how: str = "") -> None:
        rows.append({"piece": piece, "seconds": timed_calls(fn, repeats, spec["device"])[1], "how": how})

    with TemporaryDirectory() as tmp:
        trainer = build_trainer(params, model, tok, problems, dev, Path(tmp), log=lambda _m: None)
        step = step_batches(trainer, problems, spec["rollouts"], spec["micro_batch"])
        batch, rollouts, parts = step.batch, step.rollouts, step.parts
        s_batches = [b.to(dev) for b in step.student]
        t_batches = [b.to(dev) for b in step.teacher]
        engine = trainer.backend.sampler.module()
        head = lm_head(model).weight

        add("sampling (whole rollout)", lambda: trainer.rollout(batch, 0))
        if hasattr(engine, "hidden"):
            add("  prompts' prefill alone", lambda: [engine.hidden(p.student_ids) for p in batch])
        add("sampler sync", trainer.backend.sampler.sync)
        add("sampling, TRL's way", lambda: sample(model, [p.student_ids for p in batch], params.opsd.sampling,
                                                  tok.pad_token_id, trainer.eos_ids, 0, dev),
            "generate on the LoRA model, training dtype")
        add("teacher forward", lambda: [trainer.teacher.hidden(b) for b in t_batches])

        def hf_teacher() -> None:
            with torch.no_grad(), model.disable_adapter():
                for b in t_batches:
                    completion_hidden(model, b)

        add("teacher forward, TRL's way", hf_teacher, "adapter disabled, padded batch, training dtype")
        model.train()
        teacher_hidden = [trainer.teacher.hidden(b) for b in t_batches]

        def student() -> None:
            for b in s_batches:
                trainer.student_hidden(b).float().pow(2).mean().backward()
            model.zero_grad(set_to_none=True)

        add("student forward + backward", student)
        student_hidden = [completion_hidden(model, b).detach().requires_grad_(True) for b in s_batches]
        masks = [m.to(dev) for _, _, m in parts]

        def loss() -> None:
            for h, th, (_, ids, _m), mask in zip(student_hidden, teacher_hidden, parts, masks, strict=True):
                value, _ = chunked_divergence_loss(h, th, head, mask, trainer.spec, sampled_ids=ids.to(dev),
                                                   chunk_size=params.opsd.chunk_size, denom=rollouts.num_tokens,
                                                   teacher_lm_head_weight=trainer.teacher.lm_head_weight())
                value.backward()

        add("loss (chunked, forward + gradient)", loss)
        temperature = trainer.spec.temperature

        def full_logits_loss() -> None:
            for h, th, mask in zip(student_hidden, teacher_hidden, masks, strict=True):
                kl = naive_token_kl(h @ head.T, th @ head.T, temperature)
                ((kl * mask).sum() / rollouts.num_tokens).backward()

        add("loss, TRL's way", full_logits_loss, "full [B, L, V] logits in the hidden states' dtype, fp32 log-softmax")
        add("scoring (accumulate: all of the above but sampling)", lambda: trainer.accumulate(batch, rollouts))

        trainer.accumulate(batch, rollouts)
        start = clock.now()
        trainer.optimizer_step()
        rows.append({"piece": "optimizer step", "seconds": clock.now() - start, "how": "one measurement"})
        profile = _profile(trainer, batch, clock) if spec.get("profile") else None
    return {"rows": rows, "profile": profile}


def _profile(trainer: Any, batch: list[Any], clock: Clock, top: int = 15) -> dict[str, Any]:
    """One whole step under torch.profiler: wall and device-busy seconds, kernel launches, the top operators."""
    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = clock.cuda
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    clock.now()  # nothing queued from before is counted
    with profile(activities=activities) as prof:
        start = clock.now()
        with record_function("opsd.rollout"):
            rollouts = trainer.rollout(batch, 1)
        with record_function("opsd.accumulate"):
            trainer.accumulate(batch, rollouts)
        with record_function("opsd.optimizer_step"):
            trainer.optimizer_step()
        wall = clock.now() - start
    events = prof.key_averages()
    # self device time: each kernel counted once, not again in every operator around it
    busy_us = sum(e.self_device_time_total for e in events) if cuda else None
    launches = sum(e.count for e in events if e.key in _LAUNCHES)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    ranked = sorted((e for e in events if not e.key.startswith("opsd.")), key=lambda e: getattr(e, key), reverse=True)
    return {
        "wall_s": wall,
        "device_busy_s": None if busy_us is None else busy_us / 1e6,
        "device_busy_fraction": None if busy_us is None else busy_us / 1e6 / wall,
        "kernel_launches": launches if cuda else None,
        "tokens": rollouts.num_tokens,
        "ranked_by": "device" if cuda else "cpu",
        "top": [{"op": e.key, "seconds": getattr(e, key) / 1e6, "calls": e.count} for e in ranked[:top]],
    }


def profile_text(p: dict[str, Any]) -> str:
    lines = [f"one whole step under torch.profiler: {p['wall_s']:.3f} s wall, {p['tokens']} tokens"]
    if p["device_busy_s"] is not None:
        lines.append(f"  device busy {p['device_busy_s']:.3f} s ({p['device_busy_fraction']:.0%} of the wall time), "
                     f"{p['kernel_launches']} kernel launches")
    lines.append(f"  operators by {p['ranked_by']} time:")
    lines += [f"  {row['seconds']:8.4f} s {row['calls']:7d}x  {row['op'][:90]}" for row in p["top"]]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
