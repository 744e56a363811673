"""The FLUX autoencoder ("ae"): images in [-1, 1] <-> 16-channel latents at 1/8 of the resolution.

A KL autoencoder without quant convs, in Black Forest Labs' state-dict layout (`encoder.down.i.block.j`,
`decoder.up.i.block.j`, `mid.attn_1`, ...). `load_autoencoder` reads BFL's `ae.safetensors` as well as a
diffusers `vae/` folder, whose names and attention weight shapes are converted by `diffusers_vae_to_bfl`.

Shapes for the FLUX preset, image (B, 3, H, W):
    encoder: conv_in 3->128, levels 128/256/512/512 (downsample after the first three) -> (B, 512, H/8, W/8),
             mid (res, attn, res), GroupNorm, swish, conv_out -> (B, 32, H/8, W/8) = [mean ; logvar]
    decoder: conv_in 16->512, mid, levels 512/512/256/128 (upsample after the first three, in decoding
             order), GroupNorm, swish, conv_out -> (B, 3, H, W)
The latent the transformer sees is the scaled and shifted mean: z = scale_factor * (mean - shift_factor).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import (CheckpointError, assign_state_dict, download_from_hub, looks_like_repo_id,
                         read_safetensors, sharded_files)
from .strip_decoding import decode_in_strips


@dataclass(frozen=True)
class AutoEncoderParams:
    resolution: int = 256  # the training resolution; recorded for reference, any multiple of 8 works
    in_channels: int = 3
    ch: int = 128  # width of the first level; level i has ch * ch_mult[i] channels
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # per encoder level; the decoder has one more per level
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    @classmethod
    def flux(cls) -> AutoEncoderParams:
        """The autoencoder of FLUX.1 (dev, schnell, Kontext): 83,819,683 parameters."""
        return cls()


# ---------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------

def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """(GroupNorm, swish, conv3x3) twice, plus the input; a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection.

    q, k, v and proj_out are stored as 1x1 convolutions (BFL's layout) but applied as linear maps on the
    token layout (B, H*W, C): one transpose of the normalised input instead of one copy per projection,
    and the (B, 1, H*W, C) tensors handed to the fused attention kernel are contiguous.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    @staticmethod
    def _linear(conv: nn.Conv2d, tokens: torch.Tensor) -> torch.Tensor:
        return F.linear(tokens, conv.weight.flatten(1), conv.bias)  # weight (C, C, 1, 1) viewed as (C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        q, k, v = (self._linear(conv, tokens).unsqueeze(1) for conv in (self.q, self.k, self.v))  # (B, 1, H*W, C)
        out = self._linear(self.proj_out, F.scaled_dot_product_attention(q, k, v).squeeze(1))  # (B, H*W, C)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    """Halve H and W: pad one zero row/column at the bottom/right, then a stride-2 conv3x3 without padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour repeat, then a conv3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResnetBlock, AttnBlock, ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class DownLevel(nn.Module):
    """One encoder resolution level: ResnetBlocks (`block`), then an optional `downsample`."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, downsample: bool):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if j == 0 else out_channels, out_channels) for j in range(num_blocks))
        self.downsample = Downsample(out_channels) if downsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return self.downsample(x)


class UpLevel(nn.Module):
    """One decoder resolution level: ResnetBlocks (`block`), then an optional `upsample`."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, upsample: bool):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if j == 0 else out_channels, out_channels) for j in range(num_blocks))
        self.upsample = Upsample(out_channels) if upsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return self.upsample(x)


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, 2 * z_channels, H / f, W / f) = [mean ; logvar], f = 2 ** (levels - 1)."""

    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        widths = [p.ch * m for m in p.ch_mult]
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, 3, padding=1)
        self.down = nn.ModuleList(
            DownLevel(p.ch if i == 0 else widths[i - 1], widths[i], p.num_res_blocks, downsample=i < len(widths) - 1)
            for i in range(len(widths)))
        self.mid = MidBlock(widths[-1])
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * p.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, out_ch, h * f, w * f).

    `up[i]` mirrors encoder level i (width ch * ch_mult[i]) and runs in reverse order, deepest first;
    each has num_res_blocks + 1 ResnetBlocks and all but up[0] end with an upsample.
    """

    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        widths = [p.ch * m for m in p.ch_mult]
        self.conv_in = nn.Conv2d(p.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1])
        # The input width of level i is the width of level i + 1, which runs before it.
        in_widths = widths[1:] + widths[-1:]
        self.up = nn.ModuleList(
            UpLevel(in_widths[i], widths[i], p.num_res_blocks + 1, upsample=i > 0) for i in range(len(widths)))
        self.norm_out = group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], p.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    """The FLUX autoencoder. encode: image in [-1, 1] -> latent; decode: latent -> image in about [-1, 1].

    Inputs are cast to the weights' dtype; outputs come in that dtype.
    """

    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)

    @property
    def downscale(self) -> int:
        """Pixels per latent position along each axis (8 for FLUX)."""
        return 2 ** (len(self.params.ch_mult) - 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) in [-1, 1], H and W multiples of `downscale` -> (B, z_channels, H/8, W/8).

        Deterministic: the posterior mean, scaled and shifted (no sampling).
        """
        p, f = self.params, self.downscale
        if x.ndim != 4 or x.shape[1] != p.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"AutoEncoder.encode expects images (B, {p.in_channels}, H, W) with H and W "
                             f"multiples of {f}, got shape {tuple(x.shape)}")
        moments = self.encoder(x.to(self.encoder.conv_in.weight.dtype))
        mean = moments[:, :p.z_channels]  # the rest is the log-variance, unused
        return p.scale_factor * (mean - p.shift_factor)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, z_channels, h, w) latents as produced by `encode` -> (B, out_ch, h*8, w*8) images."""
        p = self.params
        if z.ndim != 4 or z.shape[1] != p.z_channels:
            raise ValueError(
                f"AutoEncoder.decode expects latents (B, {p.z_channels}, h, w), got shape {tuple(z.shape)}")
        z = z.to(self.decoder.conv_in.weight.dtype)
        return self.decoder(z / p.scale_factor + p.shift_factor)

    def decode_tiled(self, z: torch.Tensor, rows: int = 8) -> torch.Tensor:
        """`decode` with a bounded device memory: the up path runs op by op in horizontal strips of
        `rows` latent rows, the whole image's activations held on the host between ops and every
        GroupNorm given the whole image's statistics (slideredit/strip_decoding.py), so the image is
        `decode`'s up to float rounding. At 1024^2 in bf16 the device holds at most 0.24 GB of decoder
        activations instead of 1.61 GB (benchmarks/fp8_precision.py, in benchmarks/RESULTS.md)."""
        p = self.params
        if z.ndim != 4 or z.shape[1] != p.z_channels:
            raise ValueError(
                f"AutoEncoder.decode_tiled expects latents (B, {p.z_channels}, h, w), got shape {tuple(z.shape)}")
        z = z.to(self.decoder.conv_in.weight.dtype)
        return decode_in_strips(self.decoder, z / p.scale_factor + p.shift_factor, rows)


# ---------------------------------------------------------------------------------------------------
# diffusers layout -> BFL layout
# ---------------------------------------------------------------------------------------------------

# (diffusers pattern, BFL replacement), applied in order to every name. The decoder's up blocks are
# handled separately because diffusers numbers them in decoding order and BFL by resolution level.
_RENAMES = [
    (r"\.down_blocks\.(\d+)\.resnets\.", r".down.\1.block."),
    (r"\.down_blocks\.(\d+)\.downsamplers\.0\.", r".down.\1.downsample."),
    (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
    (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
    (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm."),
    (r"\.mid_block\.attentions\.0\.to_([qkv])\.", r".mid.attn_1.\1."),
    (r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid.attn_1.proj_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.conv_norm_out\.", ".norm_out."),
]
_UP_BLOCK = re.compile(r"\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.")
_ATTN_WEIGHT = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def _diffusers_to_bfl_names(names: list[str]) -> dict[str, str]:
    """Map every diffusers VAE tensor name to its BFL name; names that match no rule are kept as they are."""
    up_indices = [int(m[1]) for m in map(_UP_BLOCK.search, names) if m]
    num_up = max(up_indices, default=-1) + 1

    def up_level(m: re.Match) -> str:
        part = "block" if m[2] == "resnets" else "upsample"
        return f".up.{num_up - 1 - int(m[1])}.{part}."

    mapping = {}
    for name in names:
        bfl = _UP_BLOCK.sub(up_level, name)
        for pattern, replacement in _RENAMES:
            bfl = re.sub(pattern, replacement, bfl)
        mapping[name] = bfl
    return mapping


def diffusers_vae_to_bfl(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers `AutoencoderKL` state dict to BFL's layout; attention weights (C, C) become
    1x1 convs (C, C, 1, 1) (a view, no copy). Works on meta tensors. Unknown names pass through."""
    converted = {}
    for name, bfl in _diffusers_to_bfl_names(list(state_dict)).items():
        t = state_dict[name]
        converted[bfl] = t[:, :, None, None] if _ATTN_WEIGHT.search(bfl) and t.ndim == 2 else t
    return converted


def _is_diffusers_layout(names: Iterable[str]) -> bool:
    return any(".down_blocks." in n or ".up_blocks." in n or ".mid_block." in n for n in names)


# ---------------------------------------------------------------------------------------------------
# Sizes of a checkpoint
# ---------------------------------------------------------------------------------------------------

def _params_from_config(path: Path, base: AutoEncoderParams) -> AutoEncoderParams:
    """Sizes and latent scale/shift from a diffusers `AutoencoderKL` config.json.

    `sample_size` is not read: it would set `resolution`, which changes nothing in the computation,
    and the same weights should give the same params from `ae.safetensors` and from `vae/`."""
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable JSON config ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    # Settings that change the computation but leave no trace in the tensor shapes.
    required = {
        "_class_name": (config.get("_class_name", "AutoencoderKL"), "AutoencoderKL"),
        "norm_num_groups": (config.get("norm_num_groups", 32), 32),
        "act_fn": (config.get("act_fn", "silu"), "silu"),
        "use_quant_conv": (config.get("use_quant_conv", True), False),
        "use_post_quant_conv": (config.get("use_post_quant_conv", True), False),
        "mid_block_add_attention": (config.get("mid_block_add_attention", True), True),
    }
    for key, (value, wanted) in required.items():
        if value != wanted:
            raise CheckpointError(f"{path}: {key} = {value!r}; the FLUX autoencoder needs {wanted!r}")
    try:
        widths = [int(w) for w in config["block_out_channels"]]
        ch = widths[0]
        if any(w % ch for w in widths):
            raise ValueError(f"block_out_channels {widths} are not multiples of the first")
        shift = config.get("shift_factor")
        return replace(
            base,
            in_channels=int(config.get("in_channels", 3)),
            out_ch=int(config.get("out_channels", 3)),
            ch=ch,
            ch_mult=tuple(w // ch for w in widths),
            num_res_blocks=int(config["layers_per_block"]),
            z_channels=int(config["latent_channels"]),
            scale_factor=float(config.get("scaling_factor", base.scale_factor)),
            shift_factor=float(shift) if shift is not None else 0.0,
        )
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: not a usable AutoencoderKL config ({type(err).__name__}: {err})") from None


def _params_from_shapes(sd: dict[str, torch.Tensor], base: AutoEncoderParams) -> AutoEncoderParams:
    """Sizes read off a BFL-layout state dict. Each size whose tensors are missing keeps base's value
    (the missing tensor is then reported by the state-dict check), as do resolution and scale/shift."""
    def dim(name: str, axis: int, default: int) -> int:
        t = sd.get(name)
        return t.shape[axis] if t is not None and t.ndim > axis else default

    ch = dim("encoder.conv_in.weight", 0, dim("encoder.down.0.block.0.conv1.weight", 1, base.ch))
    levels = sorted({int(m[1]) for m in (re.match(r"encoder\.down\.(\d+)\.", k) for k in sd) if m})
    widths = [dim(f"encoder.down.{i}.block.0.conv1.weight", 0, 0) for i in levels]
    blocks = {int(m[1]) for m in (re.match(r"encoder\.down\.0\.block\.(\d+)\.", k) for k in sd) if m}
    known_widths = widths and all(w and w % ch == 0 for w in widths)
    return replace(
        base,
        in_channels=dim("encoder.conv_in.weight", 1, base.in_channels),
        out_ch=dim("decoder.conv_out.weight", 0, base.out_ch),
        ch=ch,
        ch_mult=tuple(w // ch for w in widths) if known_widths else base.ch_mult,
        num_res_blocks=len(blocks) or base.num_res_blocks,
        z_channels=dim("decoder.conv_in.weight", 1, base.z_channels),
    )


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------

_DIFFUSERS_STEM = "diffusion_pytorch_model"


def _find_checkpoint(folder: Path) -> tuple[list[Path], Path | None]:
    """The weight files (and config.json, for a diffusers folder) of the autoencoder in `folder`.

    Accepts a diffusers `vae/` folder, BFL's `ae.safetensors`, or a model folder holding either.
    """
    files = sharded_files(folder, _DIFFUSERS_STEM)
    if files:
        config = folder / "config.json"
        return files, config if config.is_file() else None
    if (folder / "ae.safetensors").is_file():
        return [folder / "ae.safetensors"], None
    if (folder / "vae").is_dir():
        return _find_checkpoint(folder / "vae")
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    shown = ", ".join(found[:20]) + (f" and {len(found) - 20} more" if len(found) > 20 else "")
    raise CheckpointError(
        f"{folder}: no autoencoder checkpoint found. Looked for a diffusers vae folder "
        f"({_DIFFUSERS_STEM}.safetensors or {_DIFFUSERS_STEM}.safetensors.index.json, with config.json), "
        f"BFL's ae.safetensors, and a vae/ subfolder; found: {shown or 'an empty folder'}")


def load_autoencoder(source: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16,
                     device: torch.device | str = "cpu", params: AutoEncoderParams | None = None) -> AutoEncoder:
    """Load the FLUX autoencoder, frozen and in eval mode, from

    - BFL's `ae.safetensors` (or a diffusers-layout .safetensors file),
    - a diffusers `vae/` folder (config.json + diffusion_pytorch_model.safetensors, possibly sharded),
    - a model folder holding `ae.safetensors` or `vae/`,
    - a Hugging Face repo id such as `black-forest-labs/FLUX.1-Kontext-dev` (downloads only `vae/`).

    Sizes come from config.json when there is one, else from the tensor shapes; `params` (default: the
    FLUX preset) supplies the rest, notably scale_factor and shift_factor for a BFL file.
    """
    base = params or AutoEncoderParams.flux()
    if looks_like_repo_id(source):
        patterns = ["vae/config.json", "vae/*.safetensors", "vae/*.safetensors.index.json"]
        snapshot = download_from_hub(str(source), patterns)
        if not (snapshot / "vae").is_dir():
            raise CheckpointError(f"{source}: the repository has no vae/ folder; pass a local ae.safetensors instead")
        source = snapshot / "vae"
    path = Path(source).expanduser()
    if path.is_dir():
        files, config = _find_checkpoint(path)
    elif path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: only .safetensors checkpoints are supported")
        files, config = [path], None
    else:
        raise CheckpointError(f"{path}: no such file or folder")

    config_params = _params_from_config(config, base) if config else None  # before reading gigabytes of a wrong folder
    state_dict, origin = read_safetensors(files, dtype=dtype, device=device)
    if _is_diffusers_layout(state_dict):
        names = _diffusers_to_bfl_names(list(state_dict))
        state_dict = diffusers_vae_to_bfl(state_dict)
        origin = {names[k]: p for k, p in origin.items()}
    params = config_params or _params_from_shapes(state_dict, base)

    with torch.device("meta"):
        model = AutoEncoder(params)
    assign_state_dict(model, state_dict, origin, "autoencoder")
    return model.eval().requires_grad_(False)
