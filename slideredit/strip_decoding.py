"""The autoencoder's decoder run in horizontal strips: the same image as `Decoder.forward`, with a
device memory peak of a few strips instead of the whole image's activations.

The decoder's peak is at full resolution, where a 1024^2 image's activations take 0.5 GB a tensor in
bf16 and a ResnetBlock holds three of them. Every op of its up path is local (3x3 convolutions, the
nearest-neighbour upsample, the swish, the residual adds) except GroupNorm, whose statistics span the
whole image; cutting the image into independent tiles changes those statistics, and the picture with
them. So the up path runs one op at a time over the whole image, each op strip by strip:

- between ops, the whole image's activation lives in host memory (the CPU);
- an op moves one strip of its inputs to the device with one row of halo above and below (a 3x3
  convolution's reach), computes it, and writes the strip's rows of its output back to the host;
- while it does, it accumulates the per-(image, group) mean and variance of its output (Chan's
  combination of per-strip moments), which is exactly the statistics the next GroupNorm needs, so each
  strip is normalised with the whole image's statistics.

conv_in and the mid block (whose attention is global) run whole at the latent resolution, where they are
small (1/64 of the pixels). The result equals the untiled decode up to float rounding: convolutions over
strips may be blocked differently from one over the whole image (tests/test_strip_decoding.py).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

HALO = 1  # rows of context a strip needs at its resolution: a 3x3 convolution reaches one row out


class GroupMoments:
    """Running per-(image, group) mean and variance of activations seen strip by strip."""

    def __init__(self, groups: int):
        self.groups = groups
        self.count = 0
        self.mean: torch.Tensor | None = None  # (B, groups) float64
        self.m2: torch.Tensor | None = None  # sum of squared deviations, (B, groups) float64

    def add(self, x: torch.Tensor) -> None:
        """x (B, C, rows, W): one strip of the activation."""
        b, c = x.shape[:2]
        values = x.reshape(b, self.groups, -1).float()
        n = values.shape[-1]
        var, mean = torch.var_mean(values, dim=-1, correction=0)
        mean, m2 = mean.double(), var.double() * n
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.pow(2) * (self.count * n / total)
        self.count = total

    def normalize(self, x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
        """nn.GroupNorm of a strip with these statistics instead of the strip's own."""
        if norm.num_groups != self.groups:
            raise ValueError(f"statistics of {self.groups} groups for a GroupNorm of {norm.num_groups} groups")
        b, c = x.shape[:2]
        mean = self.mean.float().to(x.device)[:, :, None]
        rstd = torch.rsqrt((self.m2 / self.count).float().to(x.device) + norm.eps)[:, :, None]
        y = ((x.reshape(b, self.groups, -1).float() - mean) * rstd).reshape(x.shape)
        y = y * norm.weight.float()[:, None, None] + norm.bias.float()[:, None, None]
        return y.to(x.dtype)


def map_strips(op: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], rows: int, device: torch.device,
               scale: int = 1, groups: int | None = 32) -> tuple[torch.Tensor, GroupMoments | None]:
    """Apply a local `op` (each output row depends on the input rows within HALO of it, `scale` output
    rows per input row) to full-image host tensors `inputs` (B, C, H, W), `rows` input rows at a time.
    Returns the host output and (when `groups`) the moments of the output for the next GroupNorm."""
    height = inputs[0].shape[2]
    moments = GroupMoments(groups) if groups else None
    out = None
    for top in range(0, height, rows):
        bottom = min(top + rows, height)
        lo, hi = max(top - HALO, 0), min(bottom + HALO, height)
        strip = op(*(x[:, :, lo:hi].to(device) for x in inputs))
        strip = strip[:, :, (top - lo) * scale:(bottom - lo) * scale]
        if moments is not None:
            moments.add(strip)
        if out is None:
            b, c, _, w = strip.shape
            out = torch.empty(b, c, height * scale, w, dtype=strip.dtype)  # on the host
        out[:, :, top * scale:bottom * scale] = strip
    return out, moments


def resnet_block(block: nn.Module, x: torch.Tensor, moments: GroupMoments, rows: int, device: torch.device
                 ) -> tuple[torch.Tensor, GroupMoments]:
    """ResnetBlock.forward in strips: x is the host input, `moments` its statistics."""
    h, h_moments = map_strips(lambda xs: block.conv1(F.silu(moments.normalize(xs, block.norm1))), [x], rows, device)
    return map_strips(lambda hs, xs: block.nin_shortcut(xs) + block.conv2(F.silu(h_moments.normalize(hs, block.norm2))),
                      [h, x], rows, device)


@torch.no_grad()
def decode_in_strips(decoder: nn.Module, z: torch.Tensor, rows: int = 8) -> torch.Tensor:
    """`decoder(z)` (slideredit.autoencoder.Decoder) with the up path in strips of `rows` latent rows
    (at each level, rows x its upscale pixel rows). z: (B, z_channels, h, w) on the decoder's device,
    already unscaled. Returns (B, out_ch, 8h, 8w) on that device."""
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    device = z.device
    h = decoder.mid(decoder.conv_in(z))  # whole: the attention spans every latent position
    moments = GroupMoments(decoder.up[-1].block[0].norm1.num_groups)
    moments.add(h)
    h = h.cpu()
    scale = 1
    for level in reversed(decoder.up):
        for block in level.block:
            h, moments = resnet_block(block, h, moments, rows * scale, device)
        if not isinstance(level.upsample, nn.Identity):
            h, moments = map_strips(level.upsample, [h], rows * scale, device, scale=2)
            scale *= 2
    out, _ = map_strips(lambda hs: decoder.conv_out(F.silu(moments.normalize(hs, decoder.norm_out))), [h],
                        rows * scale, device, groups=None)
    return out.to(device)
