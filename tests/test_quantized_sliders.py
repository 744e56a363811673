"""Sliders on fp8 weights: GSTLoRA and STLoRA over Fp8Linear layers equal float64 math on the dequantized
weights (the slider term is added unscaled and unquantized), zero scales and unloading give back exactly the
fp8 model, and adapter gradients through fp8 layers equal those through the dequantized float64 layers."""
import torch

from slideredit import Flux
from slideredit.quantization import FP8, Fp8Linear, dequantize, quantize_model
from slideredit.slider_checkpoints import load_adapter
from slideredit.sliders import GSTLORA, STLORA, SliderLinear, adapter_parameters, remove_adapters, set_slider_scale
from test_sliders import PARAMS, double_inputs, forward, reference_with_hooks, release_checkpoint, tiny_model, write

RELATIVE = 1e-12  # float64 on both sides; only the order of additions differs


def fp8_model(seed: int = 0) -> Flux:
    """The tiny float64 model with its block linears quantized (weights fp8, biases and the rest float64)."""
    return quantize_model(tiny_model(torch.float64, seed))


def dequantized(model: Flux) -> Flux:
    """A plain float64 Flux holding weight * weight_scale (computed in fp32, as the kernels do) in place
    of every fp8 layer: the float64 reference of what the fp8 model computes."""
    sd = model.state_dict()
    plain = {k: dequantize(v, sd[f"{k}_scale"], torch.float64) if v.dtype == FP8 else v
             for k, v in sd.items() if not k.endswith(".weight_scale")}
    reference = Flux(PARAMS).to(torch.float64)
    reference.load_state_dict(plain)
    return reference.eval().requires_grad_(False)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


def test_gstlora_on_fp8_weights_equals_float64_math_on_the_dequantized_weights(tmp_path):
    checkpoint = release_checkpoint("gstlora", PARAMS)
    model = fp8_model()
    reference = dequantized(model)
    load_adapter(model, GSTLORA, write(tmp_path, GSTLORA, checkpoint))
    layer = model.double_blocks[0].img_attn.qkv
    assert isinstance(layer, SliderLinear) and layer.weight.dtype == FP8
    inputs = double_inputs()
    base = forward(reference, inputs)
    for alpha in (1.0, -0.6):
        set_slider_scale(model, GSTLORA, alpha)
        handles = reference_with_hooks(reference, checkpoint,
                                       lambda target, x: torch.full(x.shape[:-1], alpha, dtype=x.dtype))
        expected = forward(reference, inputs)
        for h in handles:
            h.remove()
        got = forward(model, inputs)
        assert relative_error(got, expected) < RELATIVE, alpha
        assert relative_error(got, base) > 1e-3  # the slider did something


def test_stlora_on_fp8_weights_touches_only_the_selected_tokens(tmp_path):
    checkpoint = release_checkpoint("stlora", PARAMS)
    model = fp8_model(seed=1)
    reference = dequantized(model)
    load_adapter(model, STLORA, write(tmp_path, STLORA, checkpoint))
    scale = torch.zeros(2, 12, dtype=torch.float64)
    scale[:, 2:5] = 0.8
    scale[1, 7:9] = -1.2
    set_slider_scale(model, STLORA, scale)
    handles = reference_with_hooks(reference, checkpoint, lambda target, x: scale)
    inputs = double_inputs()
    expected = forward(reference, inputs)
    for h in handles:
        h.remove()
    got = forward(model, inputs)
    assert relative_error(got, expected) < RELATIVE
    assert relative_error(got, forward(reference, inputs)) > 1e-3


def test_zero_scales_and_unloading_are_exactly_the_fp8_model(tmp_path):
    """With every slider at 0 the layers run the fp8 linear itself (the same call on the same x as
    Fp8Linear.forward: bit for bit); unloading puts back Fp8Linear modules holding the same tensors."""
    base, model = fp8_model(), fp8_model()
    inputs = double_inputs()
    expected = forward(base, inputs)
    (tmp_path / "g").mkdir(), (tmp_path / "s").mkdir()
    load_adapter(model, GSTLORA, write(tmp_path / "g", GSTLORA, release_checkpoint("gstlora", PARAMS)))
    load_adapter(model, STLORA, write(tmp_path / "s", STLORA, release_checkpoint("stlora", PARAMS)))
    set_slider_scale(model, GSTLORA, 0.0)
    set_slider_scale(model, STLORA, torch.zeros(2, 12))
    assert torch.equal(forward(model, inputs), expected)
    remove_adapters(model)
    assert not any(isinstance(m, SliderLinear) for m in model.modules())
    assert type(model.double_blocks[0].txt_attn.qkv) is Fp8Linear
    assert model.state_dict().keys() == base.state_dict().keys()
    assert all(torch.equal(v.view(torch.uint8) if v.dtype == FP8 else v,
                           base.state_dict()[k].view(torch.uint8) if v.dtype == FP8 else base.state_dict()[k])
               for k, v in model.state_dict().items())
    assert torch.equal(forward(model, inputs), expected)


def test_adapter_gradients_through_fp8_layers_equal_those_through_the_dequantized_layers(tmp_path):
    """Both adapters trainable on the fp8 model and on the float64 dequantized model, the same adapter
    values: the same loss and the same gradients; the fp8 weights get none and stay as they were."""
    gst, st = release_checkpoint("gstlora", PARAMS, seed=1), release_checkpoint("stlora", PARAMS, seed=2)
    (tmp_path / "g").mkdir(), (tmp_path / "s").mkdir()
    model = fp8_model()
    reference = dequantized(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    scale = torch.zeros(2, 12, dtype=torch.float64)
    scale[:, 3:7] = 0.7
    grads = []
    for net in (model, reference):
        load_adapter(net, GSTLORA, write(tmp_path / "g", GSTLORA, gst))
        load_adapter(net, STLORA, write(tmp_path / "s", STLORA, st))
        set_slider_scale(net, GSTLORA, -0.5)
        set_slider_scale(net, STLORA, scale)
        params = {**adapter_parameters(net, GSTLORA), **adapter_parameters(net, STLORA)}
        for p in params.values():
            p.requires_grad_(True)
        out = net(**double_inputs())
        loss = (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).square().sum()
        loss.backward()
        grads.append({name: p.grad for name, p in params.items()})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name, g in grads[0].items():
        assert g is not None and relative_error(g, grads[1][name]) < 1e-10, name
    assert any(g.abs().max() > 0 for name, g in grads[0].items() if "lora_A" in name)
    for name, p in model.named_parameters():
        if p.dtype == FP8 or name.endswith("weight_scale"):
            assert p.grad is None, name
    after = model.state_dict()
    fp8_names = [k for k, v in weights.items() if v.dtype == FP8]
    assert fp8_names and all(torch.equal(after[k].view(torch.uint8), weights[k].view(torch.uint8)) for k in fp8_names)
