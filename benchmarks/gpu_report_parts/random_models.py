"""Random weights at real shapes, made on the device (nothing is downloaded, nothing allocated on the CPU
first), random adapters, and the inputs of one transformer forward."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from gpu_report_parts.setups import Setup
from slideredit.sampling import latent_ids, text_ids
from slideredit.sliders import TARGETS, add_adapter, is_fused_qkv, part_rows
from slideredit.training.distributed import local_shard
from slideredit.transformer import Flux

TRANSFORMER_SEED = 2  # the fp8 edit refills the transformer with it when it puts bf16 layers back


@torch.no_grad()
def fill_random_(module: nn.Module, seed: int) -> nn.Module:
    """Small random weights (std 0.5 / sqrt(fan_in), so activations stay moderate through 57 blocks),
    norm gains 1, small biases. Under FSDP each process fills its own shards (of the whole tensor's fan_in)."""
    device = next(module.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            local_shard(p).normal_(0, 0.5 / math.sqrt(math.prod(p.shape[1:])), generator=g)
        elif name.endswith("bias"):
            local_shard(p).normal_(0, 0.02, generator=g)
        else:
            local_shard(p).fill_(1)
    return module


def materialise(make: Callable[[], nn.Module], device: str, dtype: torch.dtype, seed: int) -> nn.Module:
    """Build on the meta device, then torch.empty on `device` in `dtype`, then fill: one copy, never on the CPU
    first (unless the device is the CPU)."""
    with torch.device("meta"):
        module = make().to(dtype)
    if any(True for _ in module.buffers()):
        raise RuntimeError(f"{type(module).__name__} has buffers: to_empty would leave them uninitialised")
    return fill_random_(module.to_empty(device=device), seed).eval().requires_grad_(False)


def random_transformer(setup: Setup) -> Flux:
    return materialise(lambda: Flux(setup.flux), setup.device, setup.dtype, seed=TRANSFORMER_SEED)


def random_adapter(model: Flux, name: str, rank: int, device: str, trainable: bool = False, seed: int = 1) -> None:
    """A random adapter on `name`'s targets, made on the device, fp32 (as load_adapter and training keep them)."""
    g = torch.Generator(device).manual_seed(seed)
    hidden = model.params.hidden_size
    weights = {}
    for module in TARGETS[name](model):
        layer = model.get_submodule(module)
        weights[module] = {}
        for part in ("q", "k", "v") if is_fused_qkv(module) else ("all",):
            start, end = part_rows(part, hidden, layer.out_features)
            lora_a = torch.randn(rank, layer.in_features, generator=g, device=device) / layer.in_features**0.5
            weights[module][part] = (lora_a, 0.02 * torch.randn(end - start, rank, generator=g, device=device))
    add_adapter(model, name, weights, trainable=trainable)


def text_span_scale(setup: Setup, alpha: float) -> Tensor:
    """STLoRA: alpha on one sub-prompt's span of text tokens, 0 elsewhere. (1, T)"""
    scale = torch.zeros(1, setup.text_tokens, device=setup.device)
    start = min(5, setup.text_tokens - 2)
    scale[:, start:start + max(1, min(7, setup.text_tokens // 4))] = alpha
    return scale


def transformer_inputs(setup: Setup, px: int, seed: int = 0) -> dict[str, Tensor]:
    """One sample: noisy + context image tokens of a px x px edit, T5 and CLIP embeddings, ids, timestep."""
    p, dev, dt = setup.flux, setup.device, setup.dtype
    side = px // 16
    g = torch.Generator(dev).manual_seed(seed)
    ids = torch.cat([latent_ids(1, side, side, first_id=0, device=dev, dtype=dt),
                     latent_ids(1, side, side, first_id=1, device=dev, dtype=dt)], dim=1)
    return dict(img=torch.randn(1, 2 * side * side, p.in_channels, generator=g, device=dev).to(dt), img_ids=ids,
                txt=torch.randn(1, setup.text_tokens, p.context_in_dim, generator=g, device=dev).to(dt),
                txt_ids=text_ids(1, setup.text_tokens, dev, dt), timesteps=torch.full((1,), 0.7, device=dev, dtype=dt),
                y=torch.randn(1, p.vec_in_dim, generator=g, device=dev).to(dt),
                guidance=torch.full((1,), 2.5, device=dev, dtype=dt))
