"""Several processes (torchrun) share one pool of in-batch negatives, as the official training does.

Every process computes its part of the global batch, all features are gathered (the process's own rows keep their
autograd graph), and each process evaluates the loss over the whole gathered batch: the same value on every
process, equal to the one-process loss on the global batch. Each process's backward reaches only its own rows, so
the gradients are summed over processes (not averaged, as DistributedDataParallel would): the sum is exactly the
gradient of the global-batch loss. The official code averages them (DDP), i.e. its step uses that gradient divided
by the number of processes (`average=True`, with --as-released); AdamW is almost insensitive to that scale (only
through eps).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def init_world(device: torch.device | None = None) -> World:
    """The torchrun world (WORLD_SIZE / RANK in the environment): NCCL on CUDA, gloo on CPU; one process without."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device is not None and device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def local_device(device: str | None) -> str | None:
    """Under torchrun on CUDA: the process's own GPU (LOCAL_RANK) unless a device is given."""
    if device is None and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def gather_rows(x: torch.Tensor, world: World) -> torch.Tensor:
    """[B, ...] per process -> [world * B, ...] in rank order; this process's rows keep their gradient."""
    if world.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world.size)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[world.rank] = x
    return torch.cat(parts)


def sum_gradients(params: Iterable[torch.nn.Parameter], world: World, average: bool = False) -> None:
    """Sum every gradient over the processes (one flat all-reduce); average=True divides by the number of processes,
    as DistributedDataParallel does in the official training."""
    if world.size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    if average:
        flat /= world.size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


@contextmanager
def main_first(world: World):
    """The main process runs the block first (e.g. fills the feature cache), then the others (reading it)."""
    if not world.is_main:
        world.barrier()
    yield
    if world.is_main:
        world.barrier()
