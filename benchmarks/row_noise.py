"""The per-token cost of drawing with per-row noise at full vocabulary (``opsd.sampling.top_k: 0``), next to a
decode step's cost, in one process.

``python -m benchmarks.row_noise [--vocab 49152,151936] [--batch 1,16] [--repeats 20] [--threads 1]``

Per vocabulary size V and batch B, the median of ``--repeats`` calls (after one untimed call) of:

* ``lm head``: ``[B, H] x [V, H]^T`` in fp32 with H the hidden size of the model with that vocabulary
  (SmolLM2-135M: 576 at 49k; Qwen3-1.7B: 2048 at 152k): a lower bound of a decode step (the head
  alone, one of the step's largest products), the proxy the issue asks for;
* ``draw top_k=0 (this tree)``: the engine's draw as the code here runs it (temperature 1.1, top-p 0.95,
  top-k 0, each row's own counter-based noise);
* ``draw top_k=0, full vocabulary``: the rule before issue 26 spelled out: the full top-p filter (a sort of V
  per row), the softmax over V and Gumbel noise hashed for all V ids (three xor-shift-multiply rounds over
  [B, V] int64) — so one run shows before and after;
* ``... of which the noise``: that last draw's Gumbel noise alone (hash, two logs, argmax over V);
* ``draw top_k=20``: the default profiles' draw, for scale.

Logits are synthetic, Zipf-shaped (probability ~ rank^-s in a random order per row): ``peaked`` (s = 2.0, a
95 % nucleus of ~20 tokens, like most of a language model's steps), ``medium`` (s = 1.5, ~1k tokens) and
``flat`` (s = 1.2, a nucleus of 19k-50k tokens, a near-uniform worst case). Each nucleus size is printed.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from benchmarks.common import OFFLINE_ENV, set_threads, timed_calls

HIDDEN = {49152: 576, 151936: 2048}  # SmolLM2-135M, Qwen3-1.7B
SHAPES = {"peaked": 2.0, "medium": 1.5, "flat": 1.2}
TEMPERATURE, TOP_P = 1.1, 0.95


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", default="49152,151936")
    parser.add_argument("--batch", default="1,16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    set_threads(args.threads)
    spec = {"vocabs": [int(v) for v in args.vocab.split(",")], "batches": [int(b) for b in args.batch.split(",")],
            "repeats": args.repeats, "threads": args.threads}
    measure(spec, report=print)
    return 0


def zipf_logits(batch: int, vocab: int, exponent: float, seed: int = 0) -> Any:
    """[batch, vocab] fp32 logits whose softmax is ~ rank^-exponent, ranks in a random order per row."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ranks = torch.argsort(torch.rand(batch, vocab, generator=gen), dim=-1).float() + 1.0
    return -exponent * ranks.log() + 0.01 * torch.randn(batch, vocab, generator=gen)


def measure(spec: dict[str, Any], report: Callable[[str], None] = lambda _line: None) -> dict[str, Any]:
    """Every row of the module docstring for each vocabulary and batch of ``spec`` (``vocabs``, ``batches``:
    lists; ``repeats``, ``threads``) → ``{V: {B: {row: ms, or a nucleus size}}}``; ``report`` gets the lines."""
    out: dict[str, Any] = {}
    report(f"median ms per decode step of {spec['repeats']} calls, {spec['threads']} thread(s), cpu; "
           f"temperature {TEMPERATURE}, top-p {TOP_P}")
    for vocab in spec["vocabs"]:
        for batch in spec["batches"]:
            rows = out.setdefault(vocab, {})[batch] = _rows(vocab, batch, spec["repeats"])
            report(f"V={vocab} (head {HIDDEN.get(vocab, 1024)} wide), B={batch}:")
            for name, value in rows.items():
                unit = "" if name.endswith("tokens") else " ms"
                share = "" if unit == "" or name == "lm head" else f"   {value / rows['lm head']:6.2f}x the head"
                report(f"  {name:42s} {value:9.2f}{unit}{share}")
    return out


def _rows(vocab: int, batch: int, repeats: int) -> dict[str, float]:
    import torch

    from opsd_core.backends.engine import _draw, filter_logits
    from opsd_core.backends.row_noise import gumbel_pick

    def ms(fn: Callable[[], object]) -> float:
        return timed_calls(fn, repeats, "cpu")[1] * 1e3

    hidden = HIDDEN.get(vocab, 1024)
    head, h = torch.randn(vocab, hidden) * 0.02, torch.randn(batch, hidden)
    seeds = torch.arange(batch, dtype=torch.int64) + 7
    rows = {"lm head": ms(lambda: torch.nn.functional.linear(h, head))}
    for shape, exponent in SHAPES.items():
        logits = zipf_logits(batch, vocab, exponent)
        full = filter_logits(logits, TEMPERATURE, 0, TOP_P).softmax(dim=-1)
        rows[f"{shape}: nucleus tokens"] = float((full > 0).sum(dim=-1).float().mean())
        rows[f"{shape}: draw top_k=0 (this tree)"] = ms(lambda lg=logits: _draw(lg, TEMPERATURE, 0, TOP_P, None,
                                                                               seeds, 3))
        rows[f"{shape}: draw top_k=0, full vocabulary"] = ms(
            lambda lg=logits: gumbel_pick(filter_logits(lg, TEMPERATURE, 0, TOP_P).softmax(dim=-1), None, seeds, 3))
        rows[f"{shape}: ... of which the noise"] = ms(lambda p=full: gumbel_pick(p, None, seeds, 3))
        rows[f"{shape}: draw top_k=20"] = ms(lambda lg=logits: _draw(lg, TEMPERATURE, 20, TOP_P, None, seeds, 3))
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
