"""Data parallelism across processes started by `torchrun`, on one node or many.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and the rendezvous address); without them this is a
single process. Each process draws its own micro-batches, and only rank 0 writes files and logs. Two
ways to hold the model (the config's `sharding`):

- "ddp": each process holds the whole frozen model; DistributedDataParallel averages the adapter's
  gradients.
- "fsdp": FSDP2 (`fully_shard`) splits every parameter, frozen or trained, along its first dimension, so
  each process holds 1/N of the model. A block is all-gathered just before it runs and freed right after
  (the teacher pass, the student pass, gradient checkpointing's recomputation); the adapter's gradients
  are reduce-scattered and AdamW updates each process's shard. Checkpoints hold the whole tensors
  (gathered), the same files as one process writes, so a run may resume with another process count.
"""
from __future__ import annotations

import gc
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from ..transformer import Flux


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

    def gather(self, value: object) -> list:
        """Every process's `value` (a picklable object), in rank order."""
        if not self.enabled:
            return [value]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered


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
        # gloo's worker threads drop a finished collective's tensors after its wait() has returned, and take
        # the GIL to do it; a group destructor that joins those threads while this thread holds the GIL
        # (pybind's dealloc does) then waits forever. Seen once under load: rank 0 hung at exit in
        # ~ProcessGroupGloo, a worker in ~AsyncAllgatherWork waiting for the GIL (the last all_gather_object).
        # Freeing what is garbage and sleeping (which releases the GIL) lets the workers finish first.
        gc.collect()
        time.sleep(0.1)
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------
# FSDP: sharding the transformer, and whole tensors for checkpoints
# ---------------------------------------------------------------------------------------------------

def shard_model(model: Flux, device: torch.device) -> None:
    """FSDP2 over all processes: each of the double and single blocks is one unit (gathered for its own
    forward, and again for its backward), then the root takes the rest (embedders, final layer). Frozen
    weights, fp8 weights with their per-row scales (both split by rows) and the adapters are all sharded;
    each shard moves to `device`, so a model loaded on the CPU reaches the GPU only as 1/N of it."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # Flux returns a slice of its token sequence, which FSDP warns about in case it is then modified in
    # place (that would drop FSDP's backward hook); the loss and the sampler only read it.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor", category=UserWarning)
    for block in (*model.double_blocks, *model.single_blocks):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


@contextmanager
def gradient_sync(student: nn.Module, enabled: bool):
    """Whether the backward passes in the block reduce the adapter's gradients across processes (off on
    all but the last micro-step of gradient accumulation: each process accumulates its own first)."""
    if enabled or not isinstance(student, (DistributedDataParallel, FSDPModule)):
        yield
    elif isinstance(student, DistributedDataParallel):
        with student.no_sync():
            yield
    else:
        student.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            student.set_requires_gradient_sync(True)


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of the parameters this process holds: its shards under FSDP, else the whole tensors."""
    return sum(local_shard(p).nbytes for p in model.parameters())


def local_shard(tensor: Tensor) -> Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor of an FSDP shard (an all-gather: every process must call it), else `tensor`."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(whole: Tensor, param: Tensor) -> Tensor:
    """This process's shard of `whole`, split as FSDP splits `param` (no communication: every process
    holds `whole`); `whole` itself when `param` is not sharded or the shapes differ (AdamW's step)."""
    if isinstance(param, DTensor) and whole.shape == param.shape:
        return distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None)
    return whole


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with its sharded moments gathered: what one process would save."""
    state = optimizer.state_dict()
    return {**state, "state": {i: {k: full_tensor(v) for k, v in s.items()} for i, s in state["state"].items()}}


def shard_optimizer_state(state: dict, params: list[Tensor]) -> dict:
    """A saved (whole) optimizer state, split like `params` (the optimizer's parameters, in order)."""
    return {**state, "state": {i: {k: shard_like(v, params[i]) for k, v in s.items()}
                               for i, s in state["state"].items()}}
