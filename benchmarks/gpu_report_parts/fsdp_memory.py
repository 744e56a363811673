"""FSDP memory per rank: with 2+ GPUs, one process per GPU (torch.multiprocessing, NCCL) shards the full-size
transformer as `--sharding fsdp` training does (slideredit/training/distributed.py's shard_model: each block,
then the root), random bf16 weights built on the meta device and materialised per shard, with a trainable
STLoRA adapter, and runs one training step at 512^2; each rank reports its local parameter bytes and its peak
device memory. With fewer GPUs (and on the CPU smoke run) nothing is launched: "not measured". Either way
the rows hold the per-rank split for 2, 4 and 8 ranks computed from the parameters' sizes, labelled a model."""
from __future__ import annotations

import json
import math
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import nn

from gpu_report_parts.measure import fmt_gib, out_of_time, peak_gib, reset_peak, wall
from gpu_report_parts.random_models import TRANSFORMER_SEED, fill_random_
from gpu_report_parts.setups import Part, Setup, real_setup
from gpu_report_parts.training_step import distillation_batch
from slideredit.sliders import STLORA, adapter_parameters, init_adapter
from slideredit.training.distributed import cleanup_distributed, local_parameter_bytes, setup_distributed, shard_model
from slideredit.transformer import Flux

MODELLED_RANKS = (2, 4, 8)


def measure(setup: Setup, deadline: float) -> Part:
    rows = modelled_rows(real_setup("meta"))
    if setup.device != "cuda":
        return Part(rows, ["not measured: a CPU run (--smoke) launches no GPU processes; the rows are the model"])
    gpus = torch.cuda.device_count()
    if gpus < 2:
        return Part(rows, [f"not measured: needs 2+ GPUs (found {gpus}); the rows are the model"])
    measured, notes = measure_ranks(setup, gpus, deadline)
    return Part(measured + rows, notes)


# ---------------------------------------------------------------------------------------------------
# the model: FSDP2's split of each parameter, from the sizes alone
# ---------------------------------------------------------------------------------------------------

def shard_rows(rows: int, world_size: int, rank: int) -> int:
    """Rows of a dim-0 length `rows` that FSDP2 gives `rank`: torch.chunk's split (ceil(rows / N) each, the
    last ranks fewer or none), without its padding."""
    chunk = math.ceil(rows / world_size)
    return min(max(rows - rank * chunk, 0), chunk)


def modelled_bytes_per_rank(model: nn.Module, world_size: int) -> list[int]:
    """Bytes of local parameter shards each rank holds after shard_model (a 0-dim parameter counts whole)."""
    held = [0] * world_size
    for p in model.parameters():
        rows = p.shape[0] if p.dim() else 1
        row_bytes = p.numel() // max(rows, 1) * p.element_size()
        for rank in range(world_size):
            held[rank] += shard_rows(rows, world_size, rank) * row_bytes
    return held


def meta_model(setup: Setup) -> Flux:
    """The transformer in bf16 with a trainable fp32 STLoRA adapter (rank setup.rank), as `--sharding fsdp`
    training holds it, on the meta device: sizes, no memory."""
    with torch.device("meta"):
        model = Flux(setup.flux).to(setup.dtype).requires_grad_(False)
        init_adapter(model, STLORA, setup.rank)
    return model


def modelled_rows(setup: Setup) -> list[dict]:
    model = meta_model(setup)
    whole = sum(p.nbytes for p in model.parameters())
    rows = []
    for world_size in MODELLED_RANKS:
        held = modelled_bytes_per_rank(model, world_size)
        rows.append({"source": "model (from parameter sizes), not measured", "ranks": world_size, "rank": "largest",
                     "local parameter bytes": max(held), "local parameter GB": f"{max(held) / 1e9:.2f}",
                     "whole model GB": f"{whole / 1e9:.2f}"})
    return rows


# ---------------------------------------------------------------------------------------------------
# the measurement: one process per device
# ---------------------------------------------------------------------------------------------------

def measure_ranks(setup: Setup, world_size: int, deadline: float) -> tuple[list[dict], list[str]]:
    """Launch `world_size` processes (NCCL on GPUs, gloo on the CPU), each sharding `setup`'s transformer
    and running one STLoRA training step; -> one row per rank, and notes. Stops them at `deadline`."""
    with tempfile.TemporaryDirectory() as folder:
        context = mp.start_processes(rank_worker, args=(world_size, free_port(), setup, folder), nprocs=world_size,
                                     join=False, start_method="spawn")
        while not context.join(timeout=1):
            if out_of_time(deadline):
                for process in context.processes:
                    process.kill()
                return [], ["stopped: time budget (the processes were killed before they reported)"]
        results = [json.loads((Path(folder) / f"rank{rank}.json").read_text()) for rank in range(world_size)]
    rows = [{"source": "measured", "ranks": world_size, "rank": r["rank"],
             "local parameter bytes": r["local_bytes"],
             "local parameter GB": f"{r['local_bytes'] / 1e9:.2f}", "whole model GB": f"{r['whole_bytes'] / 1e9:.2f}",
             "peak GiB (sharding + materialising)": fmt_gib(r["resident_gib"]),
             "peak GiB (one step)": fmt_gib(r["peak_gib"]), "step s": f"{r['step_s']:.2f}"} for r in results]
    notes = [f"{world_size} processes, one per device; FSDP2 as `--sharding fsdp` trains: each of the "
             f"{setup.flux.depth + setup.flux.depth_single_blocks} blocks, then the root; bf16 weights, STLoRA rank "
             f"{setup.rank} (fp32, trainable, sharded too), AdamW, gradient checkpointing on, {min(setup.train_px)}^2, batch 1; "
             "the peak is torch.cuda.max_memory_allocated over the first step (it includes first-call overhead)"]
    return rows, notes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def rank_worker(rank: int, world_size: int, port: int, setup: Setup, folder: str) -> None:
    """One process: join the group as torchrun would have it, shard, materialise, one step; write rank{rank}.json."""
    from slideredit.training.losses import self_distillation_loss

    os.environ.update(MASTER_ADDR="localhost", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    d = setup_distributed()
    try:
        model = meta_model(setup)
        for p in adapter_parameters(model, STLORA).values():
            p.requires_grad_(True)
        model.gradient_checkpointing = True
        whole_bytes = sum(p.nbytes for p in model.parameters())
        shard_model(model, d.device)
        fill_random_(model.to_empty(device=d.device), TRANSFORMER_SEED)  # each process allocates its shards only
        resident = peak_gib(d.device.type)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        # setup.device "cuda" is this process's GPU: setup_distributed made it the current device
        batch = distillation_batch(setup, STLORA, min(setup.train_px))  # 512^2 at the real shapes

        def step() -> None:
            self_distillation_loss(model, STLORA, batch).backward()
            optimizer.step()

        reset_peak(d.device.type)
        step_s = wall(step, d.device.type)
        result = {"rank": rank, "local_bytes": local_parameter_bytes(model), "whole_bytes": whole_bytes,
                  "resident_gib": resident, "peak_gib": peak_gib(d.device.type), "step_s": step_s}
        (Path(folder) / f"rank{rank}.json").write_text(json.dumps(result))
        d.barrier()
    finally:
        cleanup_distributed(d)
