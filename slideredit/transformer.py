"""The FLUX.1 Kontext [dev] transformer (a rectified-flow DiT), in Black Forest Labs' weight layout.

Read top to bottom: configuration, embeddings, rotary positions, the attention pieces, the two block
kinds, and the model. Text tokens always come before image tokens. Shapes: B batch, T text tokens,
L image tokens (noisy target + Kontext context), D hidden size, H heads, Dh head dim.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class FluxParams:
    in_channels: int = 64  # packed latent: 16 channels x 2 x 2
    out_channels: int = 64
    vec_in_dim: int = 768  # CLIP pooled output
    context_in_dim: int = 4096  # T5 hidden size
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19  # double-stream blocks
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)  # RoPE dims per id axis; sums to the head dim
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim or any(d % 2 for d in self.axes_dim):
            raise ValueError(f"axes_dim {self.axes_dim} must be even and sum to the head dim {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @classmethod
    def kontext_dev(cls) -> "FluxParams":
        """FLUX.1 Kontext [dev] (the same shapes as FLUX.1 [dev]): 11.9 B parameters."""
        return cls()


# ---------------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------------

def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10_000.0, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding [cos ; sin] of 1000 * t. The x1000 happens in t's own dtype (as BFL does in
    bf16); the trigonometry in fp32. (B,) -> (B, dim)."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return emb.to(t.dtype) if t.is_floating_point() else emb


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear: embeds the timestep, the guidance and the pooled CLIP vector."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


# ---------------------------------------------------------------------------------------------------
# Rotary positions: one (cos, sin) table per forward, shared by every block
# ---------------------------------------------------------------------------------------------------

def rope_table(ids: Tensor, axes_dim: tuple[int, ...], theta: int) -> tuple[Tensor, Tensor]:
    """(B, N, n_axes) position ids -> cos, sin of shape (B, 1, N, Dh/2), fp32.

    Axis i of size d_i contributes d_i/2 frequencies theta^(-2j/d_i); the angles are computed in
    float64 (positions times small frequencies) and only then rounded to fp32."""
    angles = []
    for i, d in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d)
        angles.append(ids[..., i].to(torch.float64)[..., None] * omega)
    angle = torch.cat(angles, dim=-1).unsqueeze(1)
    return angle.cos().float(), angle.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs (x[2j], x[2j+1]) of x (B, H, N, Dh) by the table's angles, in fp32."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


# ---------------------------------------------------------------------------------------------------
# Attention pieces
# ---------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """QK-norm over the head dim, computed in fp32; the learnable `scale` is applied after the cast."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x32.to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)


def split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Fused projection (B, N, 3*D), rows laid out as (3, H, Dh) -> q, k, v each (B, H, N, Dh)."""
    q, k, v = qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4)
    return q, k, v


def attention(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on q and k, scaled dot-product attention over the whole sequence, heads merged: (B, N, D)."""
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    """The fused qkv projection, QK-norm and output projection of one stream of a double block."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


# ---------------------------------------------------------------------------------------------------
# Modulation (adaLN-Zero) and the blocks
# ---------------------------------------------------------------------------------------------------

class Modulation(nn.Module):
    """SiLU(vec) -> Linear -> chunks of (shift, scale, gate), once (single blocks) or twice (double)."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec: Tensor) -> list[Tensor]:
        # (B, D) -> multiplier tensors of (B, 1, D), broadcast over tokens
        return self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """(1 + scale) * LayerNorm(x) + shift; LayerNorm without affine, eps 1e-6."""
    return (1 + scale) * F.layer_norm(x, x.shape[-1:], eps=1e-6) + shift


def gelu_mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class DoubleStreamBlock(nn.Module):
    """Separate weights for the text and image streams, one joint attention over [txt ; img]."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, qkv_bias: bool):
        super().__init__()
        self.img_mod = Modulation(dim, double=True)
        self.img_attn = SelfAttention(dim, num_heads, qkv_bias)
        self.img_mlp = gelu_mlp(dim, mlp_hidden)
        self.txt_mod = Modulation(dim, double=True)
        self.txt_attn = SelfAttention(dim, num_heads, qkv_bias)
        self.txt_mlp = gelu_mlp(dim, mlp_hidden)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(vec)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(vec)

        img_q, img_k, img_v = self.img_attn.project(modulate(img, img_shift1, img_scale1))
        txt_q, txt_k, txt_v = self.txt_attn.project(modulate(txt, txt_shift1, txt_scale1))
        joint = attention(torch.cat((txt_q, img_q), dim=2), torch.cat((txt_k, img_k), dim=2),
                          torch.cat((txt_v, img_v), dim=2), cos, sin)
        txt_out, img_out = joint.split((txt.shape[1], img.shape[1]), dim=1)

        img = img + img_gate1 * self.img_attn.proj(img_out)
        img = img + img_gate2 * self.img_mlp(modulate(img, img_shift2, img_scale2))
        txt = txt + txt_gate1 * self.txt_attn.proj(txt_out)
        txt = txt + txt_gate2 * self.txt_mlp(modulate(txt, txt_shift2, txt_scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over [txt ; img]: attention and MLP in parallel from one fused input projection
    `linear1` (rows [q | k | v | mlp]) and one fused output projection `linear2` (columns [attn ; mlp])."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        self.num_heads = num_heads
        self.dim, self.mlp_hidden = dim, mlp_hidden
        self.linear1 = nn.Linear(dim, 3 * dim + mlp_hidden)
        self.linear2 = nn.Linear(dim + mlp_hidden, dim)
        self.norm = QKNorm(dim // num_heads)
        self.modulation = Modulation(dim, double=False)

    def forward(self, x: Tensor, vec: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = self.linear1(modulate(x, shift, scale)).split((3 * self.dim, self.mlp_hidden), dim=-1)
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat((attention(q, k, v, cos, sin), F.gelu(mlp, approximate="tanh")), dim=-1))
        return x + gate * out


class LastLayer(nn.Module):
    """adaLN (shift first, in BFL's layout) then the projection back to packed latent channels."""

    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(modulate(x, shift, scale))


# ---------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------

class Flux(nn.Module):
    """FLUX.1 (Kontext) [dev] transformer. Weight names are exactly those of `flux1-kontext-dev.safetensors`."""

    def __init__(self, params: FluxParams):
        super().__init__()
        self.params = params
        dim = params.hidden_size
        self.img_in = nn.Linear(params.in_channels, dim)
        self.time_in = MLPEmbedder(256, dim)
        self.vector_in = MLPEmbedder(params.vec_in_dim, dim)
        self.guidance_in = MLPEmbedder(256, dim) if params.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(params.context_in_dim, dim)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(dim, params.num_heads, params.mlp_hidden_dim, params.qkv_bias) for _ in range(params.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(dim, params.num_heads, params.mlp_hidden_dim) for _ in range(params.depth_single_blocks))
        self.final_layer = LastLayer(dim, params.out_channels)
        self.gradient_checkpointing = False  # recompute each block's activations in the backward pass

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
                guidance: Tensor | None = None) -> Tensor:
        """img (B, L, 64), img_ids (B, L, 3), txt (B, T, 4096), txt_ids (B, T, 3), timesteps (B,) in [0, 1],
        y (B, 768), guidance (B,) -> predicted velocity (B, L, 64) for the image tokens."""
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img and txt must be (B, tokens, channels), got {tuple(img.shape)} and {tuple(txt.shape)}")
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("this model is guidance-distilled: pass a guidance strength (B,), e.g. 2.5")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)

        cos, sin = rope_table(torch.cat((txt_ids, img_ids), dim=1), self.params.axes_dim, self.params.theta)
        for block in self.double_blocks:
            img, txt = self._run(block, img, txt, vec, cos, sin)
        x = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            x = self._run(block, x, vec, cos, sin)
        return self.final_layer(x[:, txt.shape[1]:], vec)

    def _run(self, block: nn.Module, *args: Tensor):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)
