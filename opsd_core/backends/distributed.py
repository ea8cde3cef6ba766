"""Several processes training one model (``torchrun --nproc-per-node N opsd train``), data-parallel.

Each rank draws and scores its share of a step's rollouts (rollout ``i`` goes to rank ``i mod N``);
the loss divides by the step's token count summed over all ranks, and gradients are summed across
ranks before the optimizer step, so every rank applies the same update to the same weights and N
ranks compute what one process computes (up to float summation order). This is DDP's all-reduce
without its module wrapper: the trainer calls the model in several ways (student pass, teacher with
the adapter off, merged sampler copy), which a wrapper would have to see through. Only rank 0 writes
checkpoints, reports and the candidate. gloo on CPUs, NCCL on GPUs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, n: int) -> list[int]:
        """This rank's rows of a step with ``n`` rollouts (round-robin: shares differ by one at most)."""
        return list(range(self.rank, n, self.size))


def launched_size() -> int:
    """The world size torchrun set for this process (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: torch.device) -> World:
    """Join torchrun's process group (once per process); a single process needs none."""
    size = launched_size()
    if size <= 1:
        return World()
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def all_sum(values: list[float], world: World, device: torch.device) -> list[float]:
    """Element-wise sum over ranks (fp64, so counts and loss sums add exactly enough)."""
    if world.size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_max(value: float, world: World, device: torch.device) -> float:
    if world.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def sum_gradients(params: Iterable[Tensor], world: World) -> None:
    """Sum every parameter's gradient over ranks, in one flat buffer (a rank with no gradient adds zeros)."""
    if world.size == 1:
        return
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def close(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
