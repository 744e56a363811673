"""The hand-written transformer against diffusers' FluxTransformer2DModel, and against the official manifests."""
import json
from pathlib import Path

import pytest
import torch

from flux_sizes import SMALL_FLUX, TINY_FLUX
from slideredit import Flux, FluxParams, load_flux
from slideredit.transformer_loading import diffusers_to_bfl
from tiny_kontext import randomize_

MANIFESTS = Path(__file__).parent / "manifests"


def diffusers_flux(params: FluxParams, seed: int):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(
        patch_size=1, in_channels=params.in_channels, num_layers=params.depth,
        num_single_layers=params.depth_single_blocks, attention_head_dim=params.head_dim,
        num_attention_heads=params.num_heads, joint_attention_dim=params.context_in_dim,
        pooled_projection_dim=params.vec_in_dim, guidance_embeds=True, axes_dims_rope=params.axes_dim)
    randomize_(model, seed)
    return model.eval()


def kontext_ids(height: int, width: int) -> torch.Tensor:
    """(2*h*w, 3): noisy target tokens (0, row, col) then context tokens (1, row, col)."""
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    target = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)
    context = torch.stack([torch.ones_like(rows), rows, cols], dim=-1)
    return torch.cat([target, context]).float()


def kontext_inputs(params: FluxParams, batch=2, text_len=9, height=3, width=5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = kontext_ids(height, width)
    return dict(
        img=torch.randn(batch, ids.shape[0], params.in_channels, generator=gen),
        img_ids=ids.expand(batch, -1, -1),
        txt=torch.randn(batch, text_len, params.context_in_dim, generator=gen),
        txt_ids=torch.zeros(batch, text_len, 3),
        timesteps=torch.tensor([0.25, 0.9])[:batch],
        y=torch.randn(batch, params.vec_in_dim, generator=gen),
        guidance=torch.tensor([2.5, 3.5])[:batch],
    )


def diffusers_forward(model, inputs):
    with torch.no_grad():
        return model(hidden_states=inputs["img"], encoder_hidden_states=inputs["txt"],
                     pooled_projections=inputs["y"], timestep=inputs["timesteps"], img_ids=inputs["img_ids"][0],
                     txt_ids=inputs["txt_ids"][0], guidance=inputs["guidance"], return_dict=False)[0]


@pytest.mark.parametrize("params", [TINY_FLUX, SMALL_FLUX], ids=["tiny", "small"])
def test_matches_diffusers(tmp_path, params):
    reference = diffusers_flux(params, seed=3)
    reference.save_pretrained(tmp_path)
    ours = load_flux(tmp_path, dtype=torch.float32)
    assert ours.params == params

    inputs = kontext_inputs(params)
    expected = diffusers_forward(reference, inputs)
    with torch.no_grad():
        got = ours(**inputs)
    assert got.shape == expected.shape == inputs["img"].shape
    rel = (got - expected).abs().max() / expected.abs().max()
    assert rel <= 1e-5, f"max relative error {rel:.2e}"


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 0.03), (torch.float16, 0.005)])
def test_runs_in_half_precision(dtype, tolerance):
    """Same weights and inputs, rounded to the half type first, run once in fp32 and once in `dtype`:
    the difference is only the half-precision arithmetic. Timesteps and guidance are chosen so that
    1000 * t is exact in bf16 (BFL multiplies in the latent dtype)."""
    params = TINY_FLUX
    model = Flux(params)
    randomize_(model, seed=0)
    model.to(dtype).float()
    inputs = kontext_inputs(params)
    inputs.update(timesteps=torch.tensor([0.25, 0.5]), guidance=torch.tensor([2.0, 4.0]))
    inputs = {k: v.to(dtype).float() for k, v in inputs.items()}
    with torch.no_grad():
        full = model(**inputs)
        half = model.to(dtype)(**{k: v.to(dtype) for k, v in inputs.items()})
    assert half.dtype == dtype and half.isfinite().all()
    err = (half.float() - full).abs().max() / full.abs().max()
    assert err < tolerance, f"{dtype} drifts {err:.4f} from fp32"


def test_text_tokens_are_not_rotated_and_order_matters():
    """Permuting text tokens permutes nothing in the image output only if text positions carry no
    rotation; swapping two image tokens' ids must change the output (RoPE is in effect)."""
    params = TINY_FLUX
    model = Flux(params)
    randomize_(model, seed=5)
    inputs = kontext_inputs(params, batch=1)
    with torch.no_grad():
        base = model(**inputs)
        perm = torch.randperm(inputs["txt"].shape[1])
        shuffled_text = model(**{**inputs, "txt": inputs["txt"][:, perm]})
        moved = model(**{**inputs, "img_ids": inputs["img_ids"] + torch.tensor([0.0, 1.0, 0.0])})
    scale = base.abs().max()
    assert (shuffled_text - base).abs().max() / scale < 1e-6  # summation order only
    assert (moved - base).abs().max() / scale > 1e-3


def test_guidance_is_required_for_guidance_distilled_model():
    params = TINY_FLUX
    model = Flux(params)
    inputs = kontext_inputs(params)
    inputs["guidance"] = None
    with pytest.raises(ValueError, match="guidance"):
        model(**inputs)


def manifest(name: str) -> dict[str, list[int]]:
    return json.loads((MANIFESTS / name).read_text())


def test_kontext_dev_on_meta_matches_official_manifest():
    official = manifest("flux1-kontext-dev_bfl_transformer.json")
    with torch.device("meta"):
        model = Flux(FluxParams.kontext_dev())
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == official["shapes"]
    assert len(shapes) == official["tensors"] == 780
    assert sum(p.numel() for p in model.parameters()) == official["parameters"]


def test_diffusers_manifest_converts_to_bfl_manifest():
    diffusers_shapes = manifest("flux1-kontext-dev_diffusers_transformer.json")["shapes"]
    meta = {k: torch.empty(v, device="meta") for k, v in diffusers_shapes.items()}
    converted, source = diffusers_to_bfl(meta)
    assert {k: list(v.shape) for k, v in converted.items()} == manifest("flux1-kontext-dev_bfl_transformer.json")["shapes"]
    assert set(source.values()) <= set(diffusers_shapes)
