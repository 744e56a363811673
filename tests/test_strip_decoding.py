"""Decoding in strips (slideredit/strip_decoding.py, AutoEncoder.decode_tiled): the image of the untiled
decode up to float rounding, whatever the strip height, with every op of the up path seeing at most one
strip and its halo; the group moments combined over strips equal float64 statistics of the whole."""
import math

import pytest
import torch
from torch import nn

from slideredit.autoencoder import AutoEncoder, AutoEncoderParams
from slideredit.strip_decoding import HALO, GroupMoments

SMALL = AutoEncoderParams(ch=32, ch_mult=(1, 2, 1), num_res_blocks=1)  # downscale 4, a width change, fast


@pytest.fixture(scope="module")
def model() -> AutoEncoder:
    """Random weights of unit gain (PyTorch's default init would shrink the signal to nothing), norms
    with random affine parameters: every op matters to the output."""
    model = AutoEncoder(SMALL).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise / math.sqrt(p[0].numel()) if p.ndim > 1 else
                    (0.1 * noise if name.endswith("bias") else 1 + 0.1 * noise))
    return model


def latents(b: int, h: int, w: int) -> torch.Tensor:
    return torch.randn(b, 16, h, w, generator=torch.Generator().manual_seed(h * 100 + w))


@pytest.mark.parametrize("rows", [1, 3, 8, 64])
def test_strips_decode_the_untiled_image(model, rows):
    """Bound: 1e-5 of the output's largest value (about 80 float32 ULPs; measured 3-5 ULPs): the strips'
    convolutions may block differently from the whole image's, over ~15 layers. Per-tile GroupNorm
    statistics (what tiled decoders usually do) were off by 5 % RMS on this model."""
    z = latents(2, 21, 14)  # a height that no strip height divides
    with torch.no_grad():
        full, strips = model.decode(z), model.decode_tiled(z, rows=rows)
    assert strips.shape == full.shape == (2, 3, 84, 56)
    assert (strips - full).abs().max() <= 1e-5 * full.abs().max()


def test_bfloat16_strips_are_as_close_to_float32_as_the_untiled_bfloat16_decode(model):
    z = latents(1, 16, 12)
    half = AutoEncoder(SMALL).to(torch.bfloat16).eval()
    half.load_state_dict(model.state_dict())
    with torch.no_grad():
        truth = model.decode(z)
        untiled, strips = half.decode(z).float(), half.decode_tiled(z, rows=4).float()
    assert strips.dtype == torch.float32 and half.decode_tiled(z).dtype == torch.bfloat16
    assert (strips - truth).abs().max() <= 2 * (untiled - truth).abs().max() + 2 ** -8 * truth.abs().max()


def test_every_up_path_op_sees_one_strip_and_its_halo(model):
    """The device working set: convolutions after the mid block get at most rows + 2 halo rows of input
    at their resolution (the mid block runs whole, at the latent resolution)."""
    rows, z = 4, latents(1, 20, 10)
    up_convs = [m for level in model.decoder.up for m in level.modules() if isinstance(m, nn.Conv2d)]
    heights = {}
    hooks = [conv.register_forward_pre_hook(lambda m, args: heights.setdefault(m, []).append(args[0].shape[2]))
             for conv in [*up_convs, model.decoder.conv_out]]
    try:
        with torch.no_grad():
            model.decode_tiled(z, rows=rows)
    finally:
        for hook in hooks:
            hook.remove()
    scale_of = {}
    for i, level in enumerate(model.decoder.up):  # level i runs at latent scale 2 ** (levels - 1 - i)
        for m in level.modules():
            scale_of[m] = 2 ** (len(model.decoder.up) - 1 - i)
    scale_of[model.decoder.conv_out] = 2 ** (len(model.decoder.up) - 1)
    for conv in [*up_convs, model.decoder.conv_out]:
        # An upsample's conv sees the upsampled strip: twice its level's input rows.
        is_upsample = any(conv is getattr(level.upsample, "conv", None) for level in model.decoder.up)
        limit = (rows + 2 * HALO) * scale_of[conv] * (2 if is_upsample else 1)
        assert max(heights[conv]) <= limit and len(heights[conv]) > 1, (conv, heights[conv])


def test_group_moments_combine_strips_into_the_whole_images_statistics():
    x = torch.randn(2, 64, 13, 9, generator=torch.Generator().manual_seed(3)) * 3 + 1
    moments = GroupMoments(32)
    for top in range(0, 13, 4):
        moments.add(x[:, :, top:top + 4])
    values = x.double().reshape(2, 32, -1)
    assert torch.allclose(moments.mean, values.mean(-1), rtol=0, atol=1e-6)
    assert torch.allclose(moments.m2 / moments.count, values.var(-1, correction=0), rtol=1e-6, atol=0)
    norm = nn.GroupNorm(32, 64, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
        assert (moments.normalize(x, norm) - norm(x)).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="GroupNorm of 16 groups"):
        moments.normalize(x, nn.GroupNorm(16, 64))


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="rows must be at least 1"):
        model.decode_tiled(latents(1, 4, 4), rows=0)
    with pytest.raises(ValueError, match=r"decode_tiled expects latents \(B, 16, h, w\)"):
        model.decode_tiled(torch.zeros(1, 4, 6, 8))


def test_a_group_of_zero_variance_decodes_as_untiled(model):
    """A group whose channels are constant (here dead: conv1 weights and bias zero, as pruned channels are)
    has variance 0; GroupNorm's eps keeps it finite (0 * rsqrt(eps) = 0, the output is the norm's bias).
    Without eps the strips would divide 0 by 0 and return NaN. Same bound as the strips test above."""
    dead = AutoEncoder(SMALL).eval()
    dead.load_state_dict(model.state_dict())
    with torch.no_grad():
        for level in dead.decoder.up:
            for block in level.block:
                group = block.conv1.out_channels // block.norm2.num_groups
                block.conv1.weight[:group] = 0
                block.conv1.bias[:group] = 0
    z = latents(1, 10, 7)
    with torch.no_grad():
        full, strips = dead.decode(z), dead.decode_tiled(z, rows=3)
    assert torch.isfinite(full).all() and torch.isfinite(strips).all()
    assert (strips - full).abs().max() <= 1e-5 * full.abs().max()
