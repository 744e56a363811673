"""fp8 weights: the quantizer against a float64 e4m3 oracle, the e4m3 error bound, Fp8Linear, loading with
quantize="fp8" (quantized while streaming), ComfyUI-style fp8 files, and the tiny FLUX in fp8 vs fp32."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from flux_sizes import TINY_FLUX
from slideredit import CheckpointError, Flux, load_flux
from slideredit.quantization import FP8, FP8_MAX, Fp8Linear, dequantize, fp8_targets, quantize_model, quantize_rows
from slideredit.transformer import Modulation
from test_transformer import diffusers_flux, kontext_inputs

PARAMS = TINY_FLUX
# RMS relative error of e4m3 rounding for mantissas spread evenly over [1, 2): half-step uniform noise
# (step 2^-3 of the leading power of two) -> 2^-3 / sqrt(12) * sqrt(E[1/m^2]) = 2^-3 / sqrt(12) * sqrt(1/2)
E4M3_RMS_ERROR = 2 ** -3 / math.sqrt(12) * math.sqrt(0.5)  # 0.0255


# --- an independent e4m3fn oracle, from the bit layout ----------------------------------------------

def e4m3_table() -> torch.Tensor:
    """float64 value of every code 0..255: sign bit, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0
    is subnormal (m/8 * 2^-6); S.1111.111 is NaN; no infinities (the "fn" flavour)."""
    code = torch.arange(256, dtype=torch.int64)
    sign = torch.where(code >= 128, -1.0, 1.0).double()
    exponent, mantissa = (code >> 3) & 15, (code & 7).double()
    normal = (1 + mantissa / 8) * torch.pow(2.0, (exponent - 7).double())
    value = sign * torch.where(exponent == 0, mantissa / 8 * 2.0 ** -6, normal)
    return torch.where((exponent == 15) & (mantissa == 7), torch.nan, value)


def nearest_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round float64 values in [-448, 448] to the nearest e4m3 value; ties to the even code."""
    positive = e4m3_table()[:127]  # codes 0..126: 0 .. 448, increasing
    a = x.abs()
    hi = torch.searchsorted(positive, a).clamp(max=126)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = a - positive[lo], positive[hi] - a
    pick = torch.where((d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0)), hi, lo)
    return torch.copysign(positive[pick], x)


def test_oracle_decodes_like_torch():
    decoded = torch.arange(256, dtype=torch.uint8).view(FP8).double()
    assert torch.equal(decoded.isnan(), e4m3_table().isnan())
    assert torch.equal(decoded.nan_to_num(), e4m3_table().nan_to_num())
    assert e4m3_table().nan_to_num().abs().max() == FP8_MAX


def rows_of_every_kind() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g) * torch.pow(10.0, torch.empty(64, 1).uniform_(-4, 4, generator=g))
    w[0] = 0  # a zero row
    w[1] = 1e-3
    w[1, 0] = 1.0  # one large value: the others land in e4m3's subnormals
    w[2] = torch.linspace(-1, 1, 96) * 3e38  # near fp32's top
    w[3] = torch.linspace(-1, 1, 96) * 1e-38  # near fp32's bottom
    return w


def test_quantize_rows_is_round_to_nearest_of_the_scaled_row():
    """Contract: scale = max|row| / 448 in fp32 (1 for a zero row), and the code is the e4m3 value nearest
    to the fp32 quotient row / scale, clamped to +-448."""
    w = rows_of_every_kind()
    q, scale = quantize_rows(w)
    amax = w.abs().amax(dim=1)
    assert q.dtype == FP8 and scale.dtype == torch.float32 and scale.shape == (64,)
    assert torch.equal(scale, torch.where(amax > 0, amax / 448, 1.0))
    quotient = (w / scale[:, None]).double().clamp(-448, 448)
    assert torch.equal(q.double(), nearest_e4m3(quotient))


def test_e4m3_error_bound():
    """Per element: relative error <= 2^-4 where |w / scale| is normal (>= 2^-6), absolute error <=
    2^-10 * scale below that (subnormals); 2^-20 of slack covers the fp32 division and scale."""
    w = rows_of_every_kind().double()
    q, scale = quantize_rows(w.float())
    error = (q.double() * scale.double()[:, None] - w).abs()
    normal = (w / scale.double()[:, None]).abs() >= 2 ** -6
    slack = 1 + 2 ** -20
    assert (error[normal] <= 2 ** -4 * w.abs()[normal] * slack).all()
    assert (error[~normal] <= (2 ** -10 * scale.double()[:, None] * slack).expand_as(w)[~normal]).all()
    assert (error[normal] / w.abs()[normal]).max() > 0.9 * 2 ** -4  # the bound is e4m3's, not looser code


def test_never_nan_and_clamped():
    w = torch.tensor([[448.0, -448.0, 447.9, 1.0], [3e38, -3e38, 1.0, 0.0], [1e-40, -1e-40, 0.0, 0.0]])
    w = torch.cat([w, torch.randn(8, 4) * 1e6]).to(torch.bfloat16)
    q, scale = quantize_rows(w)
    assert not q.float().isnan().any() and (q.float().abs() <= FP8_MAX).all()
    assert (q.float().abs().amax(dim=1)[:2] == FP8_MAX).all()  # the row maximum lands on 448 exactly


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_is_an_error(bad):
    w = torch.randn(6, 8)
    w[4, 2] = bad
    with pytest.raises(ValueError, match="row 4 holds a non-finite value"):
        quantize_rows(w)


def test_rms_error_of_a_gaussian_layer_is_the_e4m3_expectation():
    """The module docstring's claim: a linear layer's output error is e4m3's per-element RMS error."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(512, 512, generator=g, dtype=torch.float64) / math.sqrt(512)
    x = torch.randn(256, 512, generator=g, dtype=torch.float64)
    q, scale = quantize_rows(w.float())
    deq = q.double() * scale.double()[:, None]
    assert abs((deq - w).norm() / w.norm() / E4M3_RMS_ERROR - 1) < 0.1
    assert abs((x @ deq.T - x @ w.T).norm() / (x @ w.T).norm() / E4M3_RMS_ERROR - 1) < 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_is_the_dequantized_linear(dtype):
    """Against float64: x (W_q * s)^T + b, W_q and s exactly as stored (kernels.fp8_linear, PyTorch path)."""
    linear = torch.nn.Linear(64, 48).to(dtype)
    layer = Fp8Linear.from_linear(linear)
    x = torch.randn(5, 7, 64).to(dtype)
    reference = F.linear(x.double(), layer.weight.double() * layer.weight_scale.double()[:, None], layer.bias.double())
    out = layer(x)
    assert out.dtype == dtype and out.shape == (5, 7, 48)
    eps = torch.finfo(dtype).eps
    assert (out.double() - reference).abs().max() <= 8 * eps * reference.abs().max()


def test_fp8_targets_without_modulation_leave_every_modulation_linear_out():
    """modulation=False: the targets are the block linears minus exactly the adaLN linears of every
    Modulation (double blocks' img_mod/txt_mod and single blocks' modulation), found by module type."""
    model = Flux(PARAMS).to("meta")
    modulation = {f"{name}.lin" for name, module in model.named_modules() if isinstance(module, Modulation)
                  and name.startswith(("double_blocks.", "single_blocks."))}
    assert len(modulation) == 2 * PARAMS.depth + PARAMS.depth_single_blocks
    every = fp8_targets(model)
    assert modulation <= set(every)
    assert sorted(fp8_targets(model, modulation=False)) == sorted(set(every) - modulation)


# --- loading ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    reference = diffusers_flux(PARAMS, seed=5)
    reference.save_pretrained(root / "transformer", max_shard_size="40KB")
    bfl = load_flux(root / "transformer", dtype=torch.float32).state_dict()
    save_file(bfl, root / "flux1-kontext-dev.safetensors")
    return root, bfl


@pytest.mark.parametrize("layout", ["transformer", "flux1-kontext-dev.safetensors"])
def test_block_linears_are_quantized_while_streaming(checkpoints, layout):
    """Exactly quantize_rows of each fp32 weight (row-local, so quantizing a fused projection piece by
    piece gives the same bytes); everything else exactly as stored."""
    root, bfl = checkpoints
    model = load_flux(root / layout, dtype=torch.float32, quantize="fp8")
    targets = fp8_targets(model)
    assert len(targets) == 2 * 5 * PARAMS.depth + 3 * PARAMS.depth_single_blocks  # mod, qkv, proj, mlp.0, mlp.2
    sd = model.state_dict()
    for name in targets:
        q, scale = quantize_rows(bfl[f"{name}.weight"])
        assert sd[f"{name}.weight"].dtype == FP8
        assert torch.equal(sd[f"{name}.weight"].view(torch.uint8), q.view(torch.uint8)), name
        assert torch.equal(sd[f"{name}.weight_scale"], scale), name
    for name, tensor in bfl.items():
        if name.rsplit(".", 1)[0] not in targets or name.endswith(".bias"):
            assert torch.equal(sd[name], tensor), name
    assert not any(p.requires_grad for p in model.parameters())


def test_fp8_model_computes_with_the_dequantized_weights(checkpoints):
    """The fp8 model = a plain fp32 Flux holding W_q * s in its block linears (fp32 rounding apart)."""
    root, bfl = checkpoints
    model = load_flux(root / "transformer", dtype=torch.float32, quantize="fp8")
    plain = {k: (dequantize(v, model.state_dict()[k + "_scale"]) if v.dtype == FP8 else v)
             for k, v in model.state_dict().items() if not k.endswith("weight_scale")}
    reference = Flux(PARAMS)
    reference.load_state_dict(plain)
    inputs = kontext_inputs(PARAMS)
    with torch.no_grad():
        out, expected = model(**inputs), reference.eval()(**inputs)
    assert (out - expected).abs().max() <= 64 * torch.finfo(torch.float32).eps * expected.abs().max()


def test_tiny_flux_fp8_error_is_e4m3s(checkpoints):
    """Item 5a. Expectation: each fp8 linear adds independent noise of about E4M3_RMS_ERROR (2.6 %) of its
    output; the residual stream carries it to the velocity at the same order. Measured 2.3 % (tiny),
    3.4 % (small preset, benchmarks/fp8_precision.py). A wrong scale or row would be O(1)."""
    root, _ = checkpoints
    inputs = kontext_inputs(PARAMS)
    with torch.no_grad():
        reference = load_flux(root / "transformer", dtype=torch.float32)(**inputs)
        out = load_flux(root / "transformer", dtype=torch.float32, quantize="fp8")(**inputs)
    relative = ((out - reference).norm() / reference.norm()).item()
    assert 0.5 * E4M3_RMS_ERROR <= relative <= 2 * E4M3_RMS_ERROR


# --- already-quantized files (ComfyUI's conventions, see slideredit/quantization.py) ------------------

def per_tensor_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().max() / 448
    return (w / scale).clamp(-448, 448).to(FP8), scale.reshape(())


def comfy_file(bfl: dict, style: str) -> tuple[dict, dict]:
    """A BFL file whose block linears and img_in are fp8 in one of ComfyUI's styles -> (tensors, expected
    {weight name: (fp8 weight, scale)})."""
    targets = fp8_targets(Flux(PARAMS).to("meta")) + ["img_in"]
    sd, expected = dict(bfl), {}
    for layer in targets:
        w = bfl[f"{layer}.weight"]
        if style == "unscaled":
            q, scale = w.clamp(-448, 448).to(FP8), torch.ones(())
        else:
            q, scale = per_tensor_fp8(w)
            if style == "scale_weight":
                sd[f"{layer}.scale_weight"], sd[f"{layer}.scale_input"] = scale, torch.ones(())
            else:
                sd[f"{layer}.weight_scale"] = scale
                sd[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()),
                                                          dtype=torch.uint8)
        sd[f"{layer}.weight"] = q
        expected[f"{layer}.weight"] = (q, scale)
    if style == "scale_weight":
        sd["scaled_fp8"] = torch.empty(0, dtype=FP8)
        sd = {f"model.diffusion_model.{k}": v for k, v in sd.items()}
    return sd, expected


@pytest.mark.parametrize("style", ["unscaled", "scale_weight", "weight_scale"])
def test_fp8_files_load_as_they_are(checkpoints, tmp_path, style):
    root, bfl = checkpoints
    sd, expected = comfy_file(bfl, style)
    path = tmp_path / "flux1-kontext-dev-fp8.safetensors"
    save_file(sd, path)

    quantized = load_flux(path, dtype=torch.bfloat16, quantize="fp8").state_dict()
    plain = load_flux(path, dtype=torch.float32).state_dict()
    for name, (q, scale) in expected.items():
        real = q.float() * scale
        if name == "img_in.weight":  # not a block linear: dequantized into the model's dtype
            assert torch.equal(quantized[name], real.to(torch.bfloat16))
        else:  # the file's bytes, bit for bit, and its scale on every row
            assert torch.equal(quantized[name].view(torch.uint8), q.view(torch.uint8)), name
            assert torch.equal(quantized[name + "_scale"], scale.expand(q.shape[0])), name
        assert torch.equal(plain[name], real), name
    assert torch.equal(plain["single_blocks.0.linear1.bias"], bfl["single_blocks.0.linear1.bias"])


def test_non_finite_weight_in_a_checkpoint_is_named(checkpoints, tmp_path):
    root, bfl = checkpoints
    sd = dict(bfl)
    sd["single_blocks.1.linear2.weight"] = sd["single_blocks.1.linear2.weight"].clone()
    sd["single_blocks.1.linear2.weight"][7, 3] = float("nan")
    save_file(sd, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match=r"nan\.safetensors: tensor 'single_blocks\.1\.linear2\.weight' row 7 holds a non-finite"):
        load_flux(tmp_path / "nan.safetensors", quantize="fp8")


def test_nan_code_in_an_fp8_file_is_named(checkpoints, tmp_path):
    root, bfl = checkpoints
    sd, _ = comfy_file(bfl, "unscaled")
    weight = sd["double_blocks.0.txt_mlp.2.weight"].view(torch.uint8).clone()
    weight[0, 0] = 0x7F  # e4m3fn's NaN
    sd["double_blocks.0.txt_mlp.2.weight"] = weight.view(FP8)
    save_file(sd, tmp_path / "nan8.safetensors")
    with pytest.raises(CheckpointError, match=r"'double_blocks\.0\.txt_mlp\.2\.weight' holds NaN"):
        load_flux(tmp_path / "nan8.safetensors", quantize="fp8")


def test_unsupported_quantization_format_is_named(checkpoints, tmp_path):
    root, bfl = checkpoints
    sd, _ = comfy_file(bfl, "weight_scale")
    sd["double_blocks.0.img_mlp.0.comfy_quant"] = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
    save_file(sd, tmp_path / "nvfp4.safetensors")
    with pytest.raises(CheckpointError, match=r"img_mlp\.0\.comfy_quant.*'nvfp4'"):
        load_flux(tmp_path / "nvfp4.safetensors", quantize="fp8")


def test_unknown_quantize_mode(checkpoints):
    with pytest.raises(ValueError, match="quantize must be one of"):
        load_flux(checkpoints[0] / "transformer", quantize="int4")


def test_quantize_model_in_place_matches_loading(checkpoints):
    root, _ = checkpoints
    loaded = load_flux(root / "transformer", dtype=torch.float32, quantize="fp8").state_dict()
    converted = quantize_model(load_flux(root / "transformer", dtype=torch.float32)).state_dict()
    assert loaded.keys() == converted.keys()
    assert all(torch.equal(loaded[k].view(torch.uint8) if loaded[k].dtype == FP8 else loaded[k],
                           converted[k].view(torch.uint8) if converted[k].dtype == FP8 else converted[k]) for k in loaded)


@pytest.mark.parametrize("suffix", ["scale_weight", "weight_scale"])
@pytest.mark.parametrize("bad", [[0.0], [0.5, 0.0], [-0.5], [float("nan")], [float("inf")]])
def test_zero_negative_or_non_finite_stored_scale_is_refused(checkpoints, tmp_path, suffix, bad):
    """A scale of 0 would silently zero the layer's weight; refused like a negative or non-finite one,
    naming the file and the scale tensor (a per-tensor scalar, or one bad entry of a per-row scale)."""
    root, bfl = checkpoints
    sd, _ = comfy_file(bfl, "weight_scale")
    layer = "double_blocks.0.img_attn.proj"
    sd.pop(f"{layer}.weight_scale")
    rows = sd[f"{layer}.weight"].shape[0]
    scale = torch.full((rows,), 0.25)
    scale[:len(bad)] = torch.tensor(bad)
    sd[f"{layer}.{suffix}"] = scale[0].clone() if len(bad) == 1 else scale
    path = tmp_path / "bad-scale.safetensors"
    save_file(sd, path)
    for quantize in (None, "fp8"):
        with pytest.raises(CheckpointError, match=rf"bad-scale\.safetensors: scale tensor '{layer}\.{suffix}' "
                                                  "holds a non-positive or non-finite value"):
            load_flux(path, quantize=quantize)


def per_row_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 rows with one scale per row, each row's maximum at 448 (a stored per-row layout, made here)."""
    scale = w.abs().amax(dim=1) / 448
    return (w / scale[:, None]).clamp(-448, 448).to(FP8), scale


def test_per_row_scales_follow_their_rows_through_the_diffusers_conversion(checkpoints, tmp_path):
    """A diffusers-layout fp8 file with a per-row `weight_scale` on every linear. The pieces the loader
    cuts must take their own rows' scales: `norm_out.linear` is read as two swapped halves (BFL's
    [shift; scale] from diffusers' [scale; shift]), and q, k, v are stacked into one fused projection."""
    root, _ = checkpoints
    diffusers = {k: v for shard in sorted((root / "transformer").glob("*.safetensors")) for k, v in load_file(shard).items()}
    sd, real = {}, {}
    for name, w in diffusers.items():
        if name.endswith(".weight") and w.ndim == 2:
            q, scale = per_row_fp8(w)
            sd[name], sd[name.removesuffix("weight") + "weight_scale"] = q, scale
            real[name] = (q, scale)
        else:
            sd[name] = w
    folder = tmp_path / "fp8-diffusers"
    folder.mkdir()
    save_file(sd, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text((root / "transformer" / "config.json").read_text())

    def dequantized(name: str) -> torch.Tensor:
        q, scale = real[name]
        return q.float() * scale[:, None]

    plain = load_flux(folder, dtype=torch.float32).state_dict()
    shift_scale = dequantized("norm_out.linear.weight")
    half = shift_scale.shape[0] // 2
    assert torch.equal(plain["final_layer.adaLN_modulation.1.weight"], torch.cat([shift_scale[half:], shift_scale[:half]]))
    qkv = [f"transformer_blocks.0.attn.to_{p}.weight" for p in "qkv"]
    assert torch.equal(plain["double_blocks.0.img_attn.qkv.weight"], torch.cat([dequantized(n) for n in qkv]))

    quantized = load_flux(folder, dtype=torch.float32, quantize="fp8").state_dict()
    assert torch.equal(quantized["final_layer.adaLN_modulation.1.weight"], plain["final_layer.adaLN_modulation.1.weight"])
    assert torch.equal(quantized["double_blocks.0.img_attn.qkv.weight"].view(torch.uint8),
                       torch.cat([real[n][0] for n in qkv]).view(torch.uint8))
    assert torch.equal(quantized["double_blocks.0.img_attn.qkv.weight_scale"], torch.cat([real[n][1] for n in qkv]))
