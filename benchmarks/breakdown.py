"""One training step taken apart: each piece of an opsd step timed alone, next to the same piece done TRL's way.

``python -m benchmarks.breakdown [--impl opsd|opsd_bf16s|opsd_fast (default: the fastest this CPU has)] [--model smollm2] [--new-tokens 32] [--repeats 3]``

Pieces are the trainer's own calls: ``OPSDTrainer.rollout`` (and the prompts' prefill alone), the
sampler sync, ``teacher.hidden``, the student's ``student_hidden`` + backward, ``chunked_divergence_loss``
forward + gradient, the whole ``accumulate`` and ``optimizer_step``. "TRL's way" is transformers on the
LoRA model in the training dtype: ``generate`` with the adapter unmerged, and the teacher as one padded
batch with the adapter disabled. Medians of ``--repeats`` timings after one warm-up call each.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from tempfile import TemporaryDirectory

from benchmarks.common import add_step_arguments, start_step_case


def _time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(parser, ["opsd", "opsd_bf16s", "opsd_fast"], None, 4, 2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    spec = start_step_case(args)
    import torch

    from benchmarks.step_opsd import _setup, step_batches
    from opsd_core.algorithm.losses import chunked_divergence_loss
    from opsd_core.algorithm.rollout import sample
    from opsd_core.algorithm.scoring import completion_hidden, lm_head
    from opsd_core.stages.train import build_trainer

    params, model, tok, problems, dev = _setup(spec)
    with TemporaryDirectory() as tmp:
        trainer = build_trainer(params, model, tok, problems, dev, Path(tmp), log=lambda _m: None)
        step = step_batches(trainer, problems, args.rollouts, args.micro_batch)
        batch, rollouts, parts, s_batches, t_batches = step.batch, step.rollouts, step.parts, step.student, step.teacher
        mb = args.micro_batch
        engine = trainer.backend.sampler.module()
        rows: list[tuple[str, float, str]] = []

        def add(name: str, fn: Callable[[], object], how: str = "") -> None:
            rows.append((name, _time(fn, args.repeats), how))

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

        def loss() -> None:
            for h, th, (_, ids, mask) in zip(student_hidden, teacher_hidden, parts, strict=True):
                value, _ = chunked_divergence_loss(h, th, lm_head(model).weight, mask, trainer.spec, sampled_ids=ids,
                                                   chunk_size=params.opsd.chunk_size, denom=rollouts.num_tokens,
                                                   teacher_lm_head_weight=trainer.teacher.lm_head_weight())
                value.backward()

        add("loss (chunked, forward + gradient)", loss)
        add("scoring (accumulate: all of the above but sampling)", lambda: trainer.accumulate(batch, rollouts))

        def optimizer() -> None:
            trainer.accumulate(batch, rollouts)
            start = time.perf_counter()
            trainer.optimizer_step()
            rows.append(("optimizer step", time.perf_counter() - start, "one measurement"))

        optimizer()
    print(f"{spec['impl']} on {args.model}: {args.rollouts} rollouts x {args.new_tokens} tokens, micro-batch {mb}, "
          f"{args.threads} threads; median of {args.repeats}")
    for name, seconds, how in rows:
        print(f"{name:55s} {seconds:7.3f} s  {how}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
