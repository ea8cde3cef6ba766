"""The student and teacher passes under two settings of the packed CPU path, alternating in one process.

``python -m benchmarks.ab_packs [--model smollm2] [--repeats 4]``

On a shared machine timings move between minutes, so two settings measured in separate processes can
differ by more than the change itself. Here one trainer is built, and the fp32 packs and the bf16 packs
(``train.frozen_dtype: bfloat16``) take turns (A B, B A, ...) on the same micro-batches: the student's
forward + backward (``OPSDTrainer.student_hidden``) and the fixed teacher's forward. Each timing
follows one untimed call that rebuilds the packs. Prints the median and every timing of each.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from tempfile import TemporaryDirectory

from benchmarks.common import add_step_arguments, start_step_case


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(parser, ["opsd"], "opsd", 4, 2)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args(argv)
    spec = start_step_case(args)
    import torch

    from opsd_core.backends.capabilities import probe

    if not probe().onednn_bf16:
        raise SystemExit(f"ab_packs compares fp32 and bf16 oneDNN packs; this CPU cannot pack bf16 "
                         f"({probe().describe()})")

    from benchmarks.step_opsd import _setup, step_batches
    from opsd_core.stages.train import build_trainer

    params, model, tok, problems, dev = _setup(spec)
    with TemporaryDirectory() as tmp:
        trainer = build_trainer(params, model, tok, problems, dev, Path(tmp), log=lambda _m: None)
        packs = trainer.backend.packs
        if packs is None:
            raise SystemExit("the packed CPU path is off here (train.packed_weights, or no oneDNN)")
        step = step_batches(trainer, problems, args.rollouts, args.micro_batch)
        model.train()

        def use(setting: str) -> None:  # what from_setting builds for each value of train.frozen_dtype
            packs.compute = torch.bfloat16 if setting == "bf16" else None
            packs.clear()

        def student() -> None:
            for b in step.student:
                trainer.student_hidden(b).float().pow(2).mean().backward()
            model.zero_grad(set_to_none=True)

        def teacher() -> None:
            for b in step.teacher:
                trainer.teacher.hidden(b)

        passes: dict[str, Callable[[], None]] = {"student forward + backward": student, "teacher forward": teacher}
        print(f"{args.model}: {args.rollouts} rollouts x {args.new_tokens} tokens, micro-batch {args.micro_batch}, "
              f"{args.threads} threads; fp32 packs vs bf16 packs, alternating, {args.repeats} each")
        for name, fn in passes.items():
            times: dict[str, list[float]] = {"fp32": [], "bf16": []}
            for rep in range(args.repeats):
                for setting in (["fp32", "bf16"] if rep % 2 == 0 else ["bf16", "fp32"]):
                    use(setting)
                    fn()
                    start = time.perf_counter()
                    fn()
                    times[setting].append(time.perf_counter() - start)
            for setting, values in times.items():
                print(f"{name:28s} {setting}  {statistics.median(values):6.3f} s  "
                      f"({', '.join(f'{v:.2f}' for v in values)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
