"""Host memory of writing a checkpoint from an FSDP2-sharded full fine-tuning, on each rank.

``python -m benchmarks.fsdp_gather [--ranks 2] [--layers 30] [--hidden 576] [--ffn 1536] [--vocab 49152]``
(the defaults: SmolLM2-135M's shape, random weights) starts the ranks on gloo (CPU) with torchrun, shards
the model as ``opsd train`` does (``backends.fsdp.shard``), takes one AdamW step so the moments exist, then
builds the checkpoint's whole-tensor state from a fresh high-water mark (VmHWM), in two runs of new
processes (freed memory that the allocator keeps would hide the second way's growth in one process):
every rank keeping what it gathered (how opsd saved until 2026-12-01) and only rank 0 keeping it
(``fsdp.gather_to_host(keep=rank == 0)``, how it saves now). Prints each rank's growth in MB per way; the
expected size of a whole state is 12 bytes a parameter in fp32 (weights and two moments).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import REPO, rss_mb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--ffn", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--keep", choices=["all", "main"], default="main", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args)
    rows: dict[str, list[dict[str, float]]] = {}
    for keep in ("all", "main"):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.ranks}",
                   "-m", "benchmarks.fsdp_gather", "--worker", tmp, "--keep", keep, "--layers", str(args.layers),
                   "--hidden", str(args.hidden), "--ffn", str(args.ffn), "--vocab", str(args.vocab)]
            subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), check=True)
            rows[keep] = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank-*.json"))]
    params = rows["main"][0]["params"]
    print(f"{params / 1e6:.1f}M parameters, {args.ranks} ranks (gloo); whole fp32 state "
          f"(weights + 2 AdamW moments): {12 * params / 2**20:.0f} MB")
    if not all(r["per_phase"] for r in rows["main"]):
        print("warning: this kernel refuses to reset VmHWM: the growth below is over the whole process")
    print(f"{'rank':>4} {'every rank keeps: growth MB':>28} {'rank 0 keeps: growth MB':>24}")
    for every, main_only in zip(rows["all"], rows["main"], strict=True):
        print(f"{every['rank']:>4} {every['growth_mb']:>28.0f} {main_only['growth_mb']:>24.0f}")
    return 0


def _worker(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as torch_dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.common import PeakMemory
    from opsd_core.backends import fsdp

    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo")
    rank = torch_dist.get_rank()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                         num_attention_heads=max(args.hidden // 64, 1), num_key_value_heads=max(args.hidden // 192, 1),
                         vocab_size=args.vocab, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    fsdp.shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, args.vocab, (1, 16))
    hidden = fsdp.decoder_call(model)(input_ids=ids, use_cache=False)
    (hidden.float().pow(2).mean() + model.lm_head.weight.sum() * 0.0).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    keep = args.keep == "all" or rank == 0
    mem = PeakMemory("cpu")
    torch_dist.barrier()
    mem.reset()
    before = rss_mb()
    state = (fsdp.gather_to_host(dict(model.named_parameters()), keep),
             fsdp.full_optimizer_state(optimizer.state_dict(), keep))
    out = {"rank": rank, "params": params, "growth_mb": mem.read_mb() - before, "per_phase": mem.per_phase}
    del state
    Path(args.worker, f"rank-{rank}.json").write_text(json.dumps(out))
    torch_dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
