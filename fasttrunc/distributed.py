"""A sweep sharded over ``torch.distributed`` ranks, as ``torchrun`` starts them.

Each rank evaluates every ``world``-th cell of each round and shares it with the others (so
every rank holds the whole result); rank 0 alone prints and writes; the cells are computed by the same code on the same inputs, so the result
equals a single-process run's. Gloo on CPUs, NCCL on GPUs, each rank on its own device
(``LOCAL_RANK``).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from fasttrunc.experiments.sweep import Shard


class TorchShard(Shard):
    """This process's place among the ranks of the default process group."""

    def __init__(self, rank: int, world: int):
        self.rank = rank
        self.world = world

    def gather(self, item: object) -> list[object]:
        out: list[object] = [None] * self.world
        dist.all_gather_object(out, item)
        return out

    def broadcast(self, item: object) -> object:
        """Rank 0's ``item`` on every rank."""
        box = [item]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher) as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device: str) -> tuple[TorchShard, str]:
    """Join the process group torchrun set up; returns the shard and this rank's device."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(local)
        backend, device = "nccl", f"cuda:{local}"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return TorchShard(dist.get_rank(), dist.get_world_size()), device


def stop() -> None:
    """Leave the process group together: every rank waits for the others (rank 0 writes the
    results after the last collective) before it is torn down, so no rank exits while a peer
    still holds its connections open."""
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
