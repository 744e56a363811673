"""The Black Forest Labs layouts against a reference no one here wrote: diffusers' own converters.

Each test writes a file in a BFL layout with random weights (the FLUX transformer single file,
`ae.safetensors`, a BFL/kohya-style LoRA), converts it with diffusers' single-file or LoRA converter
to the diffusers layout, loads that into diffusers' model, and compares outputs with our model loaded
from the BFL file itself. The project's own converters (diffusers -> BFL) take no part: a mistake
made consistently in them and in our model would pass the other parity tests but fail here.
The BFL tensor names come from our modules, which test_transformer.py / test_autoencoder.py check
against the official files' manifests.
"""
import pytest
import torch
from safetensors.torch import load_file, save_file

from flux_sizes import SMALL_FLUX, TINY_AUTOENCODER
from slideredit import Flux, FluxParams, load_autoencoder, load_flux
from slideredit.autoencoder import AutoEncoder
from slideredit.slider_checkpoints import load_adapter
from slideredit.sliders import GSTLORA, STLORA, TARGETS, set_slider_scale
from test_transformer import diffusers_forward, kontext_inputs
from tiny_kontext import VAE_CONFIG, randomize_

PARAMS = SMALL_FLUX  # 2 double + 3 single blocks, hidden 96, MLP 384, RoPE split (8, 12, 12)


class FluxWidths:
    """Stands in for `torch` inside diffusers' FLUX converter, which hard-codes FLUX.1's widths in one
    `torch.split` of the single blocks' linear1: (3072, 3072, 3072, 12288) = q, k, v, MLP rows. Those two
    widths are mapped to the test model's; the order of the pieces stays diffusers' own."""

    def __init__(self, params: FluxParams):
        self.widths = {3072: params.hidden_size, 12288: params.mlp_hidden_dim}

    def __getattr__(self, name):
        return getattr(torch, name)

    def split(self, tensor, sizes, dim=0):
        return torch.split(tensor, [self.widths[s] for s in sizes], dim=dim)


def diffusers_transformer(params: FluxParams, state_dict: dict):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(
        patch_size=1, in_channels=params.in_channels, num_layers=params.depth,
        num_single_layers=params.depth_single_blocks, attention_head_dim=params.head_dim,
        num_attention_heads=params.num_heads, joint_attention_dim=params.context_in_dim,
        pooled_projection_dim=params.vec_in_dim, guidance_embeds=True, axes_dims_rope=params.axes_dim)
    model.load_state_dict(state_dict, strict=True)
    return model.double().eval()


@pytest.fixture(scope="module")
def bfl_transformer(tmp_path_factory):
    """(BFL single file with random weights, diffusers' conversion of it)."""
    import diffusers.loaders.single_file_utils as single_file_utils

    path = tmp_path_factory.mktemp("bfl") / "flux1-kontext-dev.safetensors"
    save_file({k: v.contiguous() for k, v in randomize_(Flux(PARAMS), seed=21).state_dict().items()}, path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(single_file_utils, "torch", FluxWidths(PARAMS))
        converted = single_file_utils.convert_flux_transformer_checkpoint_to_diffusers(dict(load_file(path)))
    return path, converted


def inputs64():
    return {k: v.double() for k, v in kontext_inputs(PARAMS).items()}


def relative_error(got, expected) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


def test_bfl_transformer_file_matches_diffusers_single_file_conversion(bfl_transformer):
    path, converted = bfl_transformer
    reference = diffusers_transformer(PARAMS, converted)
    ours = load_flux(path, dtype=torch.float64, params=PARAMS)  # a BFL file holds no RoPE split
    expected = diffusers_forward(reference, inputs64())
    with torch.no_grad():
        got = ours(**inputs64())
    # float64 except diffusers' sinusoidal timestep embedding, computed in float32 (measured 3e-8);
    # a layout mistake (swapped q/k/v, shift/scale, MLP rows) shows as errors of order 0.1
    assert relative_error(got, expected) < 1e-6


def test_bfl_autoencoder_file_matches_diffusers_ldm_vae_conversion(tmp_path):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    path = tmp_path / "ae.safetensors"
    save_file({k: v.contiguous() for k, v in randomize_(AutoEncoder(TINY_AUTOENCODER), 22).state_dict().items()},
              path)
    reference = AutoencoderKL(**VAE_CONFIG)
    reference.load_state_dict(convert_ldm_vae_checkpoint(dict(load_file(path)), VAE_CONFIG), strict=True)
    reference = reference.double().eval()
    ours = load_autoencoder(path, dtype=torch.float64)

    image = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 - 1
    scale, shift = VAE_CONFIG["scaling_factor"], VAE_CONFIG["shift_factor"]
    with torch.no_grad():
        latent = (reference.encode(image).latent_dist.mean - shift) * scale
        decoded = reference.decode(latent / scale + shift).sample
        assert relative_error(ours.encode(image), latent) < 1e-10
        assert relative_error(ours.decode(latent), decoded) < 1e-10


# --- a BFL/kohya-style LoRA: `diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight`, `.alpha` ---

RANK, KOHYA_ALPHA = 4, 2.0  # the update is scaled by alpha / rank = 0.5


def bfl_lora(kind: str, seed: int) -> dict[str, torch.Tensor]:
    """Random lora_down (r, d_in) / lora_up (rows, r) / alpha for every target of `kind`; a fused
    q/k/v projection's lora_up covers its 3 * hidden q, k, v rows."""
    model = Flux(PARAMS)  # only for the layer sizes
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for module in TARGETS[kind](model):
        layer = model.get_submodule(module)
        rows = 3 * PARAMS.hidden_size if module.endswith(("qkv", "linear1")) else layer.out_features
        out[f"diffusion_model.{module}.lora_down.weight"] = torch.randn(RANK, layer.in_features, generator=gen) / 10
        out[f"diffusion_model.{module}.lora_up.weight"] = torch.randn(rows, RANK, generator=gen) / 10
        out[f"diffusion_model.{module}.alpha"] = torch.tensor(KOHYA_ALPHA)
    return out


def diffusers_lora(lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' kohya FLUX LoRA converter on the same tensors, renamed to kohya's flat names
    (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`). That converter also hard-codes
    FLUX.1's widths for the single blocks' linear1 (q, k, v, MLP rows), which a 96-wide model cannot
    pass; GSTLoRA's linear1 LoRA touches only the q, k, v rows, so it is split into diffusers' to_q /
    to_k / to_v here, with the alpha / rank scale applied to lora_up."""
    kohya, single = {}, {}
    for name, tensor in lora.items():
        name = name.removeprefix("diffusion_model.")
        if name.endswith(".alpha"):
            module, suffix = name.removesuffix(".alpha"), "alpha"
        else:
            module, half, _ = name.rsplit(".", 2)
            suffix = f"{half}.weight"
        if module.startswith("single_blocks."):
            single.setdefault(module, {})[suffix] = tensor
        else:
            kohya[f"lora_unet_{module.replace('.', '_')}.{suffix}"] = tensor
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    converted = _convert_kohya_flux_lora_to_diffusers(kohya)
    for module, parts in single.items():
        index = module.split(".")[1]
        up = parts["lora_up.weight"] * (float(parts["alpha"]) / parts["lora_down.weight"].shape[0])
        for proj, rows in zip(("to_q", "to_k", "to_v"), up.chunk(3)):
            converted[f"transformer.single_transformer_blocks.{index}.attn.{proj}.lora_A.weight"] = parts["lora_down.weight"]
            converted[f"transformer.single_transformer_blocks.{index}.attn.{proj}.lora_B.weight"] = rows
    return converted


@pytest.mark.parametrize("kind", [GSTLORA, STLORA])
def test_bfl_style_lora_matches_diffusers_kohya_conversion(bfl_transformer, tmp_path, kind):
    """Our loader reads the BFL-style file (fused q/k/v, kohya alpha); diffusers converts the same
    tensors and applies them with peft. A slider at alpha on every (text) token is a plain LoRA at
    scale alpha."""
    path, converted = bfl_transformer
    lora = bfl_lora(kind, seed=23)
    file = tmp_path / "lora.safetensors"
    save_file(lora, file)
    alpha = 0.7

    reference = diffusers_transformer(PARAMS, converted)
    reference.load_lora_adapter(diffusers_lora(lora), adapter_name="slider", prefix="transformer")
    reference.set_adapters("slider", weights=alpha)
    reference.double()
    expected = diffusers_forward(reference, inputs64())

    ours = load_flux(path, dtype=torch.float64, params=PARAMS)
    load_adapter(ours, kind, file)
    inputs = inputs64()
    set_slider_scale(ours, kind, alpha if kind == GSTLORA else torch.full(inputs["txt"].shape[:2], alpha))
    with torch.no_grad():
        got = ours(**inputs)
        base = diffusers_forward(diffusers_transformer(PARAMS, converted), inputs64())
    assert relative_error(got, expected) < 1e-6  # adapters are float32 in both; the rest float64
    assert relative_error(expected, base) > 1e-3  # the LoRA did something
