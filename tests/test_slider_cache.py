"""SliderLinear's stacked-adapter cache: reused between calls, rebuilt on every change, never in the
autograd graph; all-zero adapters skipped (then the layer is exactly its nn.Linear)."""
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from flux_sizes import TINY_FLUX
from slideredit import Flux
from slideredit.sliders import GSTLORA, STLORA, Adapter, LoRAPart, SliderLinear, add_adapter, init_adapter, \
    remove_adapters, set_slider_scale

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from op_counts import OpCounter, count_ops  # noqa: E402

D, T, R = 8, 6, 2
EPS64 = torch.finfo(torch.float64).eps


def qkv_layer(names=(GSTLORA,), seed=0, trainable=False) -> SliderLinear:
    """A fused-qkv-like layer (d -> 3d, bias) with 3-part adapters, float64."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(D, 3 * D).double()
    with torch.no_grad():
        base.weight.copy_(torch.randn(3 * D, D, generator=g, dtype=torch.float64))
        base.bias.copy_(torch.randn(3 * D, generator=g, dtype=torch.float64))
    layer = SliderLinear(base).requires_grad_(False)
    for name in names:
        parts = {p: LoRAPart(torch.randn(R, D, generator=g, dtype=torch.float64),
                             torch.randn(D, R, generator=g, dtype=torch.float64), i * D, (i + 1) * D)
                 for i, p in enumerate("qkv")}
        layer.adapters[name] = Adapter(parts).requires_grad_(trainable)
    return layer


def reference(layer: SliderLinear, x: torch.Tensor) -> torch.Tensor:
    """x W^T + b + sum over switched-on adapters and their parts of s * (x A^T) B^T in the part's rows,
    written directly from the parameters (differentiable in them)."""
    y = x @ layer.weight.t() + layer.bias
    for adapter in layer.adapters.values():
        if adapter.scale is None:
            continue
        s = adapter.scale.to(x.dtype)
        s = s.reshape(*s.shape, *([1] * (x.dim() - 1 - s.dim())))[..., None]  # (B, T) -> (B, T, 1)
        rows = []
        for part in adapter.parts.values():
            rows.append((part.start, part.end, s * ((x @ part.lora_A.t()) @ part.lora_B.t())))
        delta = torch.zeros_like(y)
        for start, end, d in rows:
            delta = delta + nn.functional.pad(d, (start, y.shape[-1] - end))
        y = y + delta
    return y


def close(a, b, ulps=16):
    return (a - b).abs().max() <= ulps * EPS64 * b.abs().max()


def x_in(seed=1, batch=2):
    return torch.randn(batch, T, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_cached_calls_issue_fewer_ops_and_changes_rebuild():
    layer, x = qkv_layer(), x_in()
    set_slider_scale(layer, GSTLORA, 0.7)
    with torch.no_grad():
        first, second, third = (count_ops(lambda: layer(x)) for _ in range(3))
        set_slider_scale(layer, GSTLORA, 0.3)
        after_change = count_ops(lambda: layer(x))
    assert second == third and second[1] < first[1] and after_change == first


def test_zero_or_off_adapters_are_exactly_the_linear():
    layer, x = qkv_layer((GSTLORA, STLORA)), x_in()
    linear = layer.to_linear()
    with torch.no_grad():
        want, linear_ops = linear(x), count_ops(lambda: linear(x))
        for g_scale, st_scale in ((0.0, None), (None, torch.zeros(2, T)), (0.0, torch.zeros(2, T)), (None, None)):
            set_slider_scale(layer, GSTLORA, g_scale)
            set_slider_scale(layer, STLORA, st_scale)
            assert torch.equal(layer(x), want)
            assert count_ops(lambda: layer(x)) == linear_ops
        # one zero adapter beside a live one: only the live one is applied
        set_slider_scale(layer, GSTLORA, 0.0)
        set_slider_scale(layer, STLORA, 0.5)
        got = layer(x)
        layer.adapters[GSTLORA].scale = None
        assert close(got, reference(layer, x))


def test_cache_follows_every_change():
    layer, x = qkv_layer((GSTLORA,)), x_in()
    scale = torch.tensor([[0.5], [-1.0]]).expand(2, T).contiguous()
    set_slider_scale(layer, GSTLORA, scale)
    with torch.no_grad():
        checks = [lambda: None,
                  lambda: layer.adapters[GSTLORA].parts["k"].lora_B.mul_(3),  # in place (an optimizer step)
                  lambda: layer.adapters[GSTLORA].scale.mul_(-2),  # the scale tensor itself, in place
                  lambda: setattr(layer.adapters[GSTLORA].parts["q"].lora_A, "data",
                                  torch.randn(R, D, dtype=torch.float64)),  # swapped storage (.to(), load)
                  lambda: set_slider_scale(layer, GSTLORA, 0.25),
                  lambda: layer.adapters.update({STLORA: qkv_layer((STLORA,), seed=5).adapters[STLORA]}),
                  lambda: set_slider_scale(layer, STLORA, torch.ones(2, T)),
                  lambda: layer.adapters.pop(GSTLORA)]
        for change in checks:
            change()
            for _ in range(2):  # the rebuilding call and the cached one
                assert close(layer(x), reference(layer, x))
        set_slider_scale(layer, STLORA, -0.5)
        for tokens in (x, x[:1, :3], x):  # another token shape and back, the scales unchanged
            assert close(layer(tokens), reference(layer, tokens))


def test_the_kept_hard_mask_follows_the_scales():
    """The stack keeps token scales == 0 beside the scales, or says that none is 0 (the kernel's PyTorch
    path then skips its mask, masked_fill_): a token whose scale is 0 gets exactly what it gets from
    finite adapters even where A is NaN, through scale changes to no zero at all and back."""
    layer, x = qkv_layer((STLORA,)), x_in()
    span = torch.zeros(2, T)
    span[0, 1:4], span[1, 3:5] = 0.8, -1.5
    set_slider_scale(layer, STLORA, span)
    off = span == 0

    def call() -> tuple[torch.Tensor, int]:
        with OpCounter() as counter:
            y = layer(x)
        return y, counter.non_view["aten.masked_fill_"]

    with torch.no_grad():
        finite, _ = call()
        layer.adapters[STLORA].parts["k"].lora_A.fill_(float("nan"))
        for scale, masks in ((span, 1), (torch.full((2, T), 0.3), 0), (span, 1)):
            set_slider_scale(layer, STLORA, scale)  # in place: same shape
            layer(x)  # rebuilds the stack
            y, masked_fills = call()
            assert masked_fills == masks
            if masks:
                assert torch.equal(y[off], finite[off]) and not y[~off].isfinite().any()
            else:
                assert not y.isfinite().any()


def test_set_slider_scale_copies_the_value_and_never_writes_the_callers_tensor():
    """Each adapter keeps its own scale tensor, written in place by later values of the same shape: the
    tensors a caller passes (e.g. a schedule's cached per-step scales) stay as they were, and changing one
    afterwards does not reach the layer."""
    layer, x = qkv_layer(), x_in()
    first, second = torch.full((2, 1), 0.5), torch.full((2, 1), -1.5)
    set_slider_scale(layer, GSTLORA, first)
    set_slider_scale(layer, GSTLORA, second)
    assert torch.equal(first, torch.full((2, 1), 0.5)) and torch.equal(second, torch.full((2, 1), -1.5))
    with torch.no_grad():
        want = layer(x)
        second.mul_(3)
        assert torch.equal(layer(x), want)
        assert torch.equal(layer.adapters[GSTLORA].scale, torch.full((2, 1), -1.5))
        assert close(want, reference(layer, x))


def test_training_gradients_equal_the_uncached_ones_across_optimizer_steps():
    layer, x = qkv_layer((GSTLORA,), trainable=True), x_in()
    params = list(layer.adapters[GSTLORA].parameters())
    optimizer = torch.optim.AdamW(params, lr=0.1)
    dy = torch.randn(2, T, 3 * D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for scale in (0.7, torch.tensor([[1.0] * 3 + [0.0] * (T - 3)] * 2), 0.0):
        set_slider_scale(layer, GSTLORA, scale)
        with torch.no_grad():  # an evaluation between steps fills the cache; training must not use it
            assert close(layer(x), reference(layer, x))
        want = torch.autograd.grad((reference(layer, x) * dy).sum(), params)
        optimizer.zero_grad()
        (layer(x) * dy).sum().backward()
        for p, w in zip(params, want):
            assert p.grad is not None and close(p.grad, w)  # a zero scale still gives (zero) gradients
        optimizer.step()
        with torch.no_grad():
            assert close(layer(x), reference(layer, x))  # the step's in-place update invalidated the cache


def test_a_switched_off_adapter_gets_no_gradient_and_a_zero_one_gets_zeros():
    """Off (None) is not scale 0: an adapter switched off stays out of the training graph (its gradients
    stay None, so an optimizer leaves it alone), one at scale 0 is in it with zero gradients."""
    layer, x = qkv_layer((GSTLORA, STLORA), trainable=True), x_in()
    set_slider_scale(layer, GSTLORA, 0.0)
    set_slider_scale(layer, STLORA, 0.7)
    set_slider_scale(layer, STLORA, None)
    assert layer.adapters[STLORA].scale is None
    layer(x).sum().backward()
    assert all(p.grad is None for p in layer.adapters[STLORA].parameters())
    assert all(p.grad is not None and not p.grad.any() for p in layer.adapters[GSTLORA].parameters())


def test_adapters_made_under_inference_mode_follow_every_scale():
    """LoRA tensors loaded under torch.inference_mode() have no version counter to watch: their stack is
    built for each call, never kept, so a new scale is always seen."""
    with torch.inference_mode():
        layer, x = qkv_layer(), x_in()
    with torch.no_grad():
        for scale in (0.5, -0.8, 0.0, 1.25):
            set_slider_scale(layer, GSTLORA, scale)
            assert close(layer(x), reference(layer, x))


def test_a_stack_cached_under_inference_mode_serves_autograd_later():
    layer, x = qkv_layer(), x_in()
    set_slider_scale(layer, GSTLORA, 0.7)
    with torch.inference_mode():
        layer(x)
    x = x.clone().requires_grad_()
    y = layer(x)  # frozen adapters, grad for x: the cached stack is saved for backward
    (dx,) = torch.autograd.grad(y.sum(), x)
    xr = x.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(reference(layer, xr).sum(), xr)
    assert close(dx, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cast_adapters_in_the_cache_give_the_kernels_result(dtype):
    """fp32 adapters beside a lower-precision model: the cache holds them in x's dtype, as the kernel casts."""
    from slideredit.kernels.masked_lora import masked_lora_linear

    layer, x = qkv_layer(), x_in().to(dtype)
    layer.weight.data, layer.bias.data = layer.weight.data.to(dtype), layer.bias.data.to(dtype)
    for p in layer.adapters.parameters():
        p.data = p.data.float()
    set_slider_scale(layer, GSTLORA, 0.7)
    a, b = layer.adapters[GSTLORA].stacked(3 * D, 3 * R)
    want = masked_lora_linear(x, layer.weight, layer.bias, a, b, torch.full((1, 1, 1), 0.7), backend="torch")
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(layer(x), want)


def test_model_reload_and_unload_are_seen():
    params = TINY_FLUX
    torch.manual_seed(0)
    model = Flux(params).double().eval().requires_grad_(False)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    inputs = dict(img=torch.randn(1, 8, params.in_channels, dtype=torch.float64),
                  img_ids=torch.zeros(1, 8, 3, dtype=torch.float64),
                  txt=torch.randn(1, 4, params.context_in_dim, dtype=torch.float64),
                  txt_ids=torch.zeros(1, 4, 3, dtype=torch.float64), timesteps=torch.full((1,), 0.5, dtype=torch.float64),
                  y=torch.randn(1, params.vec_in_dim, dtype=torch.float64), guidance=torch.full((1,), 3.5, dtype=torch.float64))
    with torch.no_grad():
        base = model(**inputs)

    def loaded(seed):
        m = Flux(params).double().eval().requires_grad_(False)
        m.load_state_dict(model.state_dict())
        init_adapter(m, GSTLORA, R, generator=torch.Generator().manual_seed(seed))
        for _, p in m.named_parameters():
            if p.requires_grad:
                p.data.normal_(0, 0.3)
        m.requires_grad_(False)
        return m

    first, second = loaded(1), loaded(2)
    with torch.no_grad():
        for m in (first, second):
            set_slider_scale(m, GSTLORA, 0.8)
        want_second = second(**inputs)
        first(**inputs)
        # "load" the second adapter into the first model under the same name: the old stack must go
        weights = {}
        for name, layer in second.named_modules():
            if isinstance(layer, SliderLinear):
                weights[name] = {part: (p.lora_A.clone(), p.lora_B.clone())
                                 for part, p in layer.adapters[GSTLORA].parts.items()}
        add_adapter(first, GSTLORA, weights)
        set_slider_scale(first, GSTLORA, 0.8)
        assert torch.equal(first(**inputs), want_second)
        remove_adapters(first)
        assert torch.equal(first(**inputs), base)


def test_scales_set_under_inference_mode_are_cached_and_watched():
    layer, x = qkv_layer(), x_in()
    with torch.inference_mode():
        set_slider_scale(layer, GSTLORA, torch.full((2, T), 0.5))
        first, second = count_ops(lambda: layer(x)), count_ops(lambda: layer(x))
        assert second[1] < first[1]  # the scale has a version counter: the stack is reused
        assert close(layer(x), reference(layer, x))
    layer.adapters[GSTLORA].scale.mul_(-1)  # set_slider_scale's tensor, changed in place outside
    with torch.no_grad():
        assert close(layer(x), reference(layer, x))


def test_fp8_weights_keep_their_scale_and_the_zero_path_is_the_fp8_layer():
    from slideredit.kernels.masked_lora import masked_lora_linear
    from slideredit.quantization import Fp8Linear

    g = torch.Generator().manual_seed(4)
    linear = nn.Linear(D, 3 * D).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(3 * D, D, generator=g))
    fp8 = Fp8Linear.from_linear(linear)
    layer = SliderLinear(fp8)
    layer.adapters[GSTLORA] = qkv_layer().adapters[GSTLORA].float()
    x = x_in().to(torch.bfloat16)
    with torch.no_grad():
        set_slider_scale(layer, GSTLORA, 0.0)
        assert torch.equal(layer(x), fp8(x))
        set_slider_scale(layer, GSTLORA, 0.7)
        a, b = layer.adapters[GSTLORA].stacked(3 * D, 3 * R)
        want = masked_lora_linear(x, fp8.weight, fp8.bias, a, b, torch.full((1, 1, 1), 0.7), backend="torch",
                                  weight_scale=fp8.weight_scale)
        assert torch.equal(layer(x), want)
    restored = layer.to_linear()
    assert isinstance(restored, Fp8Linear) and restored.weight_scale is fp8.weight_scale
    assert restored.weight is fp8.weight and restored.bias is fp8.bias


def test_compiled_inference_takes_a_and_b_stacked_outside_the_graph():
    """Compiled blocks get A and B stacked before each call (compile.py's pre-hook runs
    refresh_compiled_stack): their inference graph never stacks them, it only reads them. Without that
    refresh (a layer compiled another way) the graph stacks them itself. Both give the eager result."""
    stacking_ops = {}
    for refresh in (True, False):
        torch._dynamo.reset()
        targets = []

        def recording(gm, example_inputs):
            targets.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
            return gm.forward

        layer, x = qkv_layer((GSTLORA, STLORA)), x_in()
        set_slider_scale(layer, GSTLORA, 0.7)
        set_slider_scale(layer, STLORA, torch.full((2, T), -0.4))
        if refresh:
            layer.refresh_compiled_stack()
        with torch.no_grad():
            assert close(torch.compile(layer, backend=recording)(x), reference(layer, x))
        stacking_ops[refresh] = targets.count(torch.cat)
    torch._dynamo.reset()
    assert stacking_ops[True] == 0 < stacking_ops[False]
