"""Data parallelism across processes started by `torchrun`.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and the rendezvous address); without them this is a
single process. Each process holds the whole frozen model and its own micro-batches; only the adapter's
gradients are averaged (DistributedDataParallel), and only rank 0 writes files and logs.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @contextmanager
    def main_process_first(self):
        """Rank 0 runs the block first (a hub download, say), the others after it, from its cache."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def all_min(self, value: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return value

    def all_mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world_size
        return value

    def union(self, items: set) -> set:
        """The union of a set over all processes (e.g. the unreadable images each one met)."""
        if not self.enabled:
            return set(items)
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, sorted(items))
        return set().union(*gathered)


def setup_distributed() -> Distributed:
    """Join the process group when started by torchrun (NCCL on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)  # binds the communicator to this GPU up front
        else:
            dist.init_process_group("gloo")
    return Distributed(rank, world_size, local_rank, device)


def cleanup_distributed(d: Distributed) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
