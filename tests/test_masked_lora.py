"""kernels.masked_lora_linear against its definition, masked_lora_reference in float64, on both backends.

The Triton path runs under TRITON_INTERPRET=1 (set in conftest.py). Its interpreter config uses 32-wide
blocks, so the shapes here (70 tokens, d_in 51, d_out 45) give partial row, column and reduction tiles.
Every Triton output buffer is filled with NaN before the kernel runs (see `poisoned_outputs`).
"""
import ast
import re
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from slideredit.kernels.masked_lora import fp8_linear, masked_lora_linear, masked_lora_reference
from slideredit.kernels import dispatch, masked_lora, masked_lora_triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from op_counts import OpCounter  # noqa: E402

BATCH, TOKENS, D_IN, D_OUT = 2, 35, 51, 45
EPS = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
INTERP_BLOCK_M = masked_lora_triton._GEMM_CONFIGS[0].kwargs["BLOCK_M"]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every Triton output (H~, G~, Y, dX) starts as NaN: an element the kernels skip stays NaN."""
    allocations = []

    def nan_empty(shape, dtype, device):
        allocations.append(shape)
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(masked_lora_triton, "_empty", nan_empty)
    return allocations


def reference(x, weight, bias, lora_a, lora_b, scale, weight_scale=None):
    """The library's definition, masked_lora_reference, with the rank read off the shapes."""
    rank = lora_a.shape[0] // scale.shape[-1]
    return masked_lora_reference(x, weight, bias, lora_a, lora_b, scale, rank, weight_scale=weight_scale)


def test_reference_by_hand():
    """Two rank-1 adapters on a 2 -> 2 identity: x A^T = (3, -1); scales (2, 3) and (2, 0)."""
    x, weight, bias = torch.tensor([[1.0, 2.0]]), torch.eye(2), torch.tensor([10.0, 20.0])
    lora_a, lora_b = torch.tensor([[1.0, 1.0], [1.0, -1.0]]), torch.eye(2)
    both_on = masked_lora_reference(x, weight, bias, lora_a, lora_b, torch.tensor([[2.0, 3.0]]), 1)
    assert both_on.tolist() == [[1 + 10 + 2 * 3, 2 + 20 + 3 * -1]]
    second_off = masked_lora_reference(x, weight, bias, lora_a, lora_b, torch.tensor([[2.0, 0.0]]), 1)
    assert second_off.tolist() == [[17.0, 22.0]]
    # fp8 form: weight * weight_scale[:, None], scaling the base term only
    fp8 = masked_lora_reference(x, 2 * weight, bias, lora_a, lora_b, torch.tensor([[2.0, 0.0]]), 1,
                                weight_scale=torch.tensor([0.5, 4.0]))
    assert fp8.tolist() == [[1 + 10 + 6, 2 * 8 + 20]]


def test_reference_zero_scale_is_a_hard_mask():
    """A zero scale adds exactly 0 even where x A^T is inf or NaN; a live one lets them through."""
    x, weight, bias, lora_a, lora_b, s = as_reference(*make_inputs(torch.float64, 3, 4, "mixed"))
    base = reference(x, weight, bias, lora_a, lora_b, torch.zeros_like(s))
    poisoned_a = lora_a.clone()
    poisoned_a[:4] = float("nan")  # adapter 0
    poisoned_a[4:8] = float("inf")  # adapter 1
    y = reference(x, weight, bias, poisoned_a, lora_b, s)
    off = (s[..., :2] == 0).all(-1)
    assert off.any() and (~off).any()
    assert torch.equal(y[off], base[off])
    assert not torch.isfinite(y[~off]).any()


def make_inputs(dtype, K, r, scales="signed", bias=True, seed=0, d_in=D_IN, d_out=D_OUT):
    """x, weight, bias in `dtype`; adapters in fp32 (as trained; fp64 beside fp64); token_scale fp32.

    Sizes keep the base and low-rank terms both O(1), so a mistake in either shows.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, TOKENS, d_in, generator=g).to(dtype)
    weight = (torch.randn(d_out, d_in, generator=g) / d_in**0.5).to(dtype)
    b = torch.randn(d_out, generator=g).to(dtype) if bias else None
    adapter_dtype = torch.promote_types(dtype, torch.float32)
    lora_a = (torch.randn(K * r, d_in, generator=g) / d_in**0.5).to(adapter_dtype)
    lora_b = (torch.randn(d_out, K * r, generator=g) / (K * r) ** 0.5).to(adapter_dtype)
    s = torch.randn(BATCH * TOKENS, K, generator=g)
    if scales == "zero":
        s.zero_()
    elif scales == "one":
        s.fill_(1.0)
    elif scales == "mixed":
        s[:40] = 0  # rows 0-39: a whole zero row tile, then 8 zero rows inside a live tile
        s[45:50] = 0  # scattered zero rows
        s[50:60, 0] = 0  # one adapter off, the others on
    return x, weight, b, lora_a, lora_b, s.view(BATCH, TOKENS, K)


def as_reference(x, weight, bias, lora_a, lora_b, scale):
    """float64 copies, adapters first rounded to x's dtype (the documented compute dtype)."""
    f64 = lambda t: None if t is None else t.detach().double()
    return f64(x), f64(weight), f64(bias), f64(lora_a.to(x.dtype)), f64(lora_b.to(x.dtype)), f64(scale)


def error_bound(ref_inputs, ulps, eps, weight_scale=None):
    """ulps * eps * (the reference evaluated on absolute values): a rounding-error bound for sums of products."""
    return ulps * eps * reference(*(None if t is None else t.abs() for t in ref_inputs), weight_scale=weight_scale)


def assert_within(actual, expected, bound, what):
    err = (actual.double() - expected).abs()
    worst = (err / bound).max().item()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    assert worst <= 1.0, f"{what}: error is {worst:.2f}x the bound (max abs error {err.max().item():.3g})"


def run(backend, allocations, *args):
    before = len(allocations)
    y = masked_lora_linear(*args, backend=backend)
    if backend == "triton":
        assert len(allocations) - before == 2, "the Triton path must allocate H~ and Y through _empty (poisoned)"
    return y


# Ulps of the magnitude bound: fp32 sums error <= n eps with n the reduction length; 16-bit inputs round the
# output once (truncated by the interpreter), the adapters once (cast to x's dtype) and H~ once.
ULPS = {torch.float64: 64, torch.float32: D_IN + 16, torch.float16: 4, torch.bfloat16: 4}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K,r", [(1, 4), (3, 16)])
@pytest.mark.parametrize("scales", ["zero", "one", "signed", "mixed"])
def test_forward_matches_float64(backend, dtype, K, r, scales, poisoned_outputs):
    inputs = make_inputs(dtype, K, r, scales)
    y = run(backend, poisoned_outputs, *inputs)
    assert y.shape == (BATCH, TOKENS, D_OUT) and y.dtype == dtype
    ref_inputs = as_reference(*inputs)
    assert_within(y, reference(*ref_inputs), error_bound(ref_inputs, ULPS[dtype], EPS[dtype]), "y")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_no_bias_and_fp16_adapters(backend, poisoned_outputs):
    x, weight, _, lora_a, lora_b, s = make_inputs(torch.float16, 3, 4, "mixed", bias=False)
    inputs = (x, weight, None, lora_a.half(), lora_b.half(), s)
    y = run(backend, poisoned_outputs, *inputs)
    ref_inputs = as_reference(*inputs)
    assert_within(y, reference(*ref_inputs), error_bound(ref_inputs, ULPS[torch.float16], EPS[torch.float16]), "y")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("scale_shape", [(1, TOKENS, 2), (TOKENS, 2), (1, 1, 2), (2,)])
def test_scale_broadcasts_over_leading_dims(backend, scale_shape, poisoned_outputs):
    x, weight, bias, lora_a, lora_b, _ = make_inputs(torch.float32, 2, 4)
    s = torch.randn(scale_shape, generator=torch.Generator().manual_seed(1))
    s.view(-1, 2)[::3] = 0  # some zero entries
    y = run(backend, poisoned_outputs, x, weight, bias, lora_a, lora_b, s)
    ref_inputs = as_reference(x, weight, bias, lora_a, lora_b, s.expand(BATCH, TOKENS, 2))
    assert_within(y, reference(*ref_inputs), error_bound(ref_inputs, ULPS[torch.float32], EPS[torch.float32]), "y")
    if backend == "torch":  # the caller's S == 0 broadcasts as S does
        kept = masked_lora_linear(x, weight, bias, lora_a, lora_b, s, backend=backend, zero_scale=s == 0)
        assert torch.equal(kept, y)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_single_token_and_empty_batch(backend):
    x, weight, bias, lora_a, lora_b, _ = make_inputs(torch.float32, 2, 4)
    s = torch.tensor([0.5, -2.0])
    y = masked_lora_linear(x[0, 0], weight, bias, lora_a, lora_b, s, backend=backend)
    ref_inputs = as_reference(x[0, 0], weight, bias, lora_a, lora_b, s)
    assert y.shape == (D_OUT,)
    assert_within(y, reference(*ref_inputs), error_bound(ref_inputs, ULPS[torch.float32], EPS[torch.float32]), "y")
    empty = masked_lora_linear(x[:, :0], weight, bias, lora_a, lora_b, s, backend=backend)
    assert empty.shape == (BATCH, 0, D_OUT)


def test_all_zero_row_tiles_never_read_lora_b():
    """A skipped tile never touches B: NaN in B cannot leak into it (0 * NaN would be NaN)."""
    x, weight, bias, lora_a, lora_b, s = make_inputs(torch.float32, 3, 4, "zero")
    y_finite = masked_lora_linear(x, weight, bias, lora_a, lora_b, s, backend="triton")
    nan_a, nan_b = torch.full_like(lora_a, float("nan")), torch.full_like(lora_b, float("nan"))
    y = masked_lora_linear(x, weight, bias, nan_a, nan_b, s, backend="triton")
    assert torch.equal(y, y_finite)
    base = as_reference(x, weight, bias, lora_a, lora_b, s)[:3]
    torch.testing.assert_close(y.double(), base[0] @ base[1].T + base[2], rtol=1e-5, atol=1e-5)

    # Only the first row tile is all zero: its rows are exact, whatever B holds.
    s = torch.randn(s.shape, generator=torch.Generator().manual_seed(2))
    s.view(-1, 3)[:INTERP_BLOCK_M] = 0
    y_tile = masked_lora_linear(x, weight, bias, lora_a, nan_b, s, backend="triton")
    assert torch.equal(y_tile.view(-1, D_OUT)[:INTERP_BLOCK_M], y_finite.view(-1, D_OUT)[:INTERP_BLOCK_M])


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
@pytest.mark.parametrize("kept", [False, True], ids=["compared per call", "zero_scale kept"])
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")  # the interpreter's inf
def test_zero_scale_is_a_hard_mask(backend, poison, kept):
    """Tokens with every scale zero get exactly the base output even if X A^T is NaN or inf (from A),
    also where the caller passes S == 0 kept from an earlier call (zero_scale)."""
    x, weight, bias, lora_a, lora_b, s = make_inputs(torch.float32, 3, 4, "mixed")
    base = masked_lora_linear(x, weight, bias, lora_a, lora_b, torch.zeros_like(s), backend=backend)
    y = masked_lora_linear(x, weight, bias, torch.full_like(lora_a, poison), lora_b, s, backend=backend,
                           zero_scale=s == 0 if kept else None)
    off = (s == 0).all(-1)
    assert off.sum() > INTERP_BLOCK_M
    assert torch.equal(y[off], base[off])
    assert not torch.isfinite(y[~off]).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("zero_scale,scales,ops", [
    (None, "mixed", ("mm", "mul_", "eq", "masked_fill_", "addmm_")),
    ("kept", "mixed", ("mm", "mul_", "masked_fill_", "addmm_")),
    (False, "signed", ("mm", "mul_", "addmm_")),
], ids=["compared per call", "zero_scale kept", "no zero scale"])
def test_torch_path_costs_3_to_5_ops_beyond_the_base_linear(dtype, zero_scale, scales, ops):
    """Per call, beside the base linear: one GEMM (X A^T), the scale (mul_), the hard mask (masked_fill_ where
    S == 0; eq first unless the caller keeps S == 0; none where it says no scale is 0) and one GEMM added
    into Y (addmm_), with adapters already in x's dtype and fp32 scales, as SliderLinear passes them.
    Views (reshapes, transposes) launch nothing."""
    x, weight, bias, lora_a, lora_b, s = make_inputs(dtype, 3, 4, scales)
    lora_a, lora_b = lora_a.to(dtype), lora_b.to(dtype)
    zero_scale = s == 0 if zero_scale == "kept" else zero_scale
    with OpCounter() as layer:
        masked_lora_linear(x, weight, bias, lora_a, lora_b, s, backend="torch", zero_scale=zero_scale)
    with OpCounter() as base:
        F.linear(x.reshape(-1, D_IN), weight, bias)
    assert not base.non_view - layer.non_view
    assert layer.non_view - base.non_view == Counter({f"aten.{op}": 1 for op in ops})


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scales", ["signed", "mixed"])
def test_a_kept_zero_scale_gives_the_same_outputs_and_gradients(dtype, scales):
    """zero_scale as SliderLinear keeps it (S == 0, or False where no scale is 0): the PyTorch path gives
    bit for bit what it computes comparing S with 0 itself, forward and backward, and matches the
    float64 reference."""
    trainable = ("x", "lora_a", "lora_b")
    inputs = make_inputs(dtype, 3, 4, scales)
    zero_scale = inputs[-1] == 0 if scales == "mixed" else False
    dy = torch.randn(BATCH, TOKENS, D_OUT, generator=torch.Generator().manual_seed(5)).to(dtype)
    kept = lambda *a: masked_lora_linear(*a, backend="torch", zero_scale=zero_scale)
    got = grads(kept, leaves(inputs, trainable), dy)
    want = grads(lambda *a: masked_lora_linear(*a, backend="torch"), leaves(inputs, trainable), dy)
    assert set(got) == set(trainable) and all(torch.equal(got[n], want[n]) for n in trainable)
    y = kept(*inputs)
    assert torch.equal(y, masked_lora_linear(*inputs, backend="torch"))
    ref_inputs = as_reference(*inputs)
    assert_within(y, reference(*ref_inputs), error_bound(ref_inputs, ULPS[dtype], EPS[dtype]), "y")


@pytest.mark.parametrize("zero_scale,error,message", [
    (True, TypeError, "zero_scale must be a bool tensor"),
    (torch.zeros(BATCH, TOKENS, 2), TypeError, "zero_scale must be a bool tensor .* got torch.float32"),
    (torch.zeros(3, TOKENS, 2, dtype=torch.bool), ValueError, r"zero_scale \(3, 35, 2\) does not broadcast"),
    (torch.zeros(2, dtype=torch.bool, device="meta"), ValueError, "zero_scale is on meta"),
], ids=["True", "float", "shape", "device"])
def test_bad_zero_scale_raises_clear_errors(zero_scale, error, message):
    with pytest.raises(error, match=message):
        masked_lora_linear(*make_inputs(torch.float32, 2, 3), backend="torch", zero_scale=zero_scale)


NAMES = ("x", "weight", "bias", "lora_a", "lora_b", "token_scale")


def leaves(tensors, trainable):
    return [None if t is None else t.detach().requires_grad_(n in trainable) for n, t in zip(NAMES, tensors)]


def grads(fn, inputs, dy):
    """Backprop dy through fn(*inputs); {name: grad} of the inputs that require grad."""
    fn(*inputs).backward(dy)
    return {n: t.grad for n, t in zip(NAMES, inputs) if t is not None and t.requires_grad}


@pytest.mark.parametrize(
    "backend,dtype",
    [("triton", torch.float32), ("triton", torch.bfloat16), ("torch", torch.float64), ("torch", torch.float32),
     ("torch", torch.bfloat16)],
)
@pytest.mark.parametrize("K,r", [(1, 16), (3, 4)])
def test_gradients_match_float64_autograd(backend, dtype, K, r, poisoned_outputs):
    # Frozen base (the slider case) for K = 1; K = 3 also trains weight and bias.
    trainable = ("x", "lora_a", "lora_b") if K == 1 else ("x", "weight", "bias", "lora_a", "lora_b")
    inputs = leaves(make_inputs(dtype, K, r, "mixed"), trainable)
    dy = torch.randn(BATCH, TOKENS, D_OUT, generator=torch.Generator().manual_seed(3))

    got = grads(lambda *a: masked_lora_linear(*a, backend=backend), inputs, dy.to(dtype))
    if backend == "triton":
        assert len(poisoned_outputs) == 4, "forward H~, Y and backward G~, dX all come from _empty"
    ref_inputs = as_reference(*inputs)
    want = grads(reference, leaves(ref_inputs, trainable), dy.double())
    # Bounds: the same gradients on absolute values (every term is a product, so this sums |terms|).
    abs_inputs = [None if t is None else t.abs() for t in ref_inputs]
    bounds = grads(reference, leaves(abs_inputs, trainable), dy.abs().double())

    assert set(got) == set(trainable)
    # One more rounding than the forward (G~ or H~ cast to x's dtype); fp32 sums also run over the tokens.
    ulps = ULPS[dtype] + (BATCH * TOKENS if dtype in (torch.float32, torch.float64) else 2)
    for name, inp in zip(NAMES, inputs):
        if name in trainable:
            assert got[name].dtype == inp.dtype, f"grad of {name} is {got[name].dtype}, expected {inp.dtype}"
            assert_within(got[name], want[name], ulps * EPS[dtype] * bounds[name], f"grad of {name}")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_reduction_a_multiple_of_the_block(backend, poisoned_outputs):
    """d_in and d_out multiples of BLOCK_D: the unmasked (EVEN_D) main loop, forward and dX."""
    trainable = ("x", "lora_a", "lora_b")
    d = 2 * masked_lora_triton._GEMM_CONFIGS[0].kwargs["BLOCK_D"]
    inputs = leaves(make_inputs(torch.float32, 2, 4, "mixed", d_in=d, d_out=d), trainable)
    dy = torch.randn(BATCH, TOKENS, d, generator=torch.Generator().manual_seed(4))
    got = grads(lambda *a: masked_lora_linear(*a, backend=backend), inputs, dy)
    y = masked_lora_linear(*inputs, backend=backend)

    ref_inputs = as_reference(*inputs)
    want = grads(reference, leaves(ref_inputs, trainable), dy.double())
    abs_inputs = [None if t is None else t.abs() for t in ref_inputs]
    bounds = grads(reference, leaves(abs_inputs, trainable), dy.abs().double())
    ulps = 2 * d + BATCH * TOKENS  # fp32 sums over d (and the tokens for the adapter gradients)
    assert_within(y, reference(*ref_inputs), error_bound(ref_inputs, ulps, EPS[torch.float32]), "y")
    for name in trainable:
        assert_within(got[name], want[name], ulps * EPS[torch.float32] * bounds[name], f"grad of {name}")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_frozen_x_backward_computes_the_adapter_gradients_only(backend, poisoned_outputs):
    """x needs no gradient (adapters trained on a fixed input): the backward runs the shrink for G~ (dA)
    but not the dX GEMM, and dA, dB still match the reference."""
    trainable = ("lora_a", "lora_b")
    inputs = leaves(make_inputs(torch.float32, 3, 4, "mixed"), trainable)
    dy = torch.randn(BATCH, TOKENS, D_OUT, generator=torch.Generator().manual_seed(7))
    got = grads(lambda *a: masked_lora_linear(*a, backend=backend), inputs, dy)
    if backend == "triton":
        assert len(poisoned_outputs) == 3, "forward H~, Y, then backward G~ only (no dX)"
    ref_inputs = as_reference(*inputs)
    want = grads(reference, leaves(ref_inputs, trainable), dy.double())
    bounds = grads(reference, leaves([None if t is None else t.abs() for t in ref_inputs], trainable),
                   dy.abs().double())
    for name in trainable:
        assert_within(got[name], want[name], (ULPS[torch.float32] + BATCH * TOKENS) * EPS[torch.float32] * bounds[name],
                      f"grad of {name}")


def test_token_scale_gets_no_gradient():
    x, weight, bias, lora_a, lora_b, s = make_inputs(torch.float32, 2, 4)
    s.requires_grad_(True)
    lora_a.requires_grad_(True)
    masked_lora_linear(x, weight, bias, lora_a, lora_b, s, backend="torch").sum().backward()
    assert lora_a.grad is not None and s.grad is None


def test_backend_none_uses_torch_on_cpu(monkeypatch):
    def fail(*args):
        raise AssertionError("the Triton path ran on CPU tensors with backend=None")

    monkeypatch.setattr(masked_lora_triton, "scaled_shrink", fail)
    monkeypatch.setattr(masked_lora_triton, "fused_linear", fail)
    x, weight, bias, lora_a, lora_b, s = make_inputs(torch.float32, 1, 4)
    assert masked_lora_linear(x, weight, bias, lora_a, lora_b, s).shape == (BATCH, TOKENS, D_OUT)


def test_torch_path_takes_stacked_rank_beyond_128():
    x, weight, bias, lora_a, lora_b, s = make_inputs(torch.float32, 3, 44)  # K*r = 132
    y = masked_lora_linear(x, weight, bias, lora_a, lora_b, s, backend="torch")
    ref_inputs = as_reference(x, weight, bias, lora_a, lora_b, s)
    assert_within(y, reference(*ref_inputs), error_bound(ref_inputs, ULPS[torch.float32], EPS[torch.float32]), "y")


def _replace(inputs, **changes):
    names = ("x", "weight", "bias", "lora_a", "lora_b", "token_scale")
    return [changes.get(n, t) for n, t in zip(names, inputs)]


BAD_INPUTS = {
    "weight d_in": (ValueError, "weight must be", lambda i: _replace(i, weight=torch.randn(D_OUT, D_IN + 1))),
    "lora_a d_in": (ValueError, "lora_a must be", lambda i: _replace(i, lora_a=torch.randn(6, D_IN - 1))),
    "lora_b rank": (ValueError, "lora_b must be", lambda i: _replace(i, lora_b=torch.randn(D_OUT, 7))),
    "lora_b d_out": (ValueError, "lora_b must be", lambda i: _replace(i, lora_b=torch.randn(D_OUT + 1, 6))),
    "bias shape": (ValueError, "bias must be", lambda i: _replace(i, bias=torch.randn(D_OUT + 1))),
    "K not dividing rank": (ValueError, "multiple of K=4", lambda i: _replace(i, token_scale=torch.ones(4))),
    "scale not broadcastable": (
        ValueError, "does not broadcast", lambda i: _replace(i, token_scale=torch.ones(3, TOKENS, 2))),
    "scale with no adapters": (ValueError, "K >= 1", lambda i: _replace(i, token_scale=torch.ones(BATCH, TOKENS, 0))),
    "integer x": (
        TypeError, "x must be a floating-point", lambda i: _replace(i, x=torch.ones(2, 3, D_IN, dtype=torch.int64))),
    "integer scale": (
        TypeError, "token_scale must be a floating-point", lambda i: _replace(i, token_scale=torch.ones(2).int())),
    "weight dtype": (TypeError, "weight must have x's dtype", lambda i: _replace(i, weight=i[1].double())),
    "device": (ValueError, "lora_b is on meta", lambda i: _replace(i, lora_b=i[4].to("meta"))),
    "not a tensor": (TypeError, "lora_a must be a torch.Tensor", lambda i: _replace(i, lora_a=[[1.0]])),
}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_clear_errors(backend, case):
    error, message, change = BAD_INPUTS[case]
    inputs = change(make_inputs(torch.float32, 2, 3))
    with pytest.raises(error, match=message):
        masked_lora_linear(*inputs, backend=backend)


def test_triton_only_errors(monkeypatch):
    x, weight, bias, lora_a, lora_b, s = make_inputs(torch.float32, 3, 43)  # K*r = 129
    with pytest.raises(ValueError, match="K\\*r <= 128"):
        masked_lora_linear(x, weight, bias, lora_a, lora_b, s, backend="triton")
    inputs = make_inputs(torch.float64, 1, 4)
    with pytest.raises(TypeError, match="triton backend takes x in"):
        masked_lora_linear(*inputs, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        masked_lora_linear(*inputs, backend="cuda")
    monkeypatch.setattr(masked_lora_triton, "INTERPRET", False)
    with pytest.raises(ValueError, match="needs CUDA tensors, or TRITON_INTERPRET=1"):
        masked_lora_linear(*make_inputs(torch.float32, 1, 4), backend="triton")


# -- fp8 weights ------------------------------------------------------------------------------------------

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_fp8(weight):
    """Per-output-row scales so each row's largest magnitude maps to e4m3's largest finite value."""
    w = weight.float()
    scale = w.abs().amax(1).clamp_min(1e-12) / FP8_MAX
    return (w / scale[:, None]).to(torch.float8_e4m3fn), scale


def fp8_inputs(dtype, K, r, scales="mixed", bias=True):
    x, weight, b, lora_a, lora_b, s = make_inputs(dtype, K, r, scales, bias=bias)
    w8, w_scale = quantize_fp8(weight)
    return x, w8, w_scale, b, lora_a, lora_b, s


def dequantized(w8, w_scale):
    return w8.double() * w_scale.double()[:, None]


# The Triton path's base term is exact products of x and fp8 values; the PyTorch path rounds the
# dequantized weight to x's dtype once more: one more ulp than the unquantized bound.
FP8_ULPS = {dtype: ulps + 1 for dtype, ulps in ULPS.items()}

# The Triton GEMM reads fp8 weights two ways: as float8_e4m3fn where Triton converts them in hardware
# (sm_89 and up: the interpreter's default here), and as bytes it decodes itself (cards below sm_89).
FP8_BACKENDS = ["triton", "triton-bytes", "torch"]


def fp8_backend(backend, monkeypatch):
    """The backend argument for one of FP8_BACKENDS: "triton-bytes" is the Triton path as it runs on
    sm_80 / sm_86, selected by faking the card check the launcher makes."""
    if backend == "triton-bytes":
        monkeypatch.setattr(masked_lora_triton, "reads_fp8_as_bytes", lambda target: True)
        return "triton"
    return backend


@triton.jit
def _decode_all_codes(codes_ptr, out_ptr):
    offs = tl.arange(0, 256)
    tl.store(out_ptr + offs, masked_lora_triton._e4m3_bytes_to_fp16(tl.load(codes_ptr + offs)))


def test_fp8_byte_decode_is_exact_on_every_finite_code():
    """The kernel's decode of all 256 byte values against torch's float8_e4m3fn -> float32 cast: value / 256
    on the 254 finite codes, both zeros included; the two NaN codes read as +-1.875 (documented)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    decoded = torch.full((256,), float("nan"), dtype=torch.float16)
    _decode_all_codes[(1,)](codes, decoded)
    value = codes.view(torch.float8_e4m3fn).float()
    finite = torch.isfinite(value)
    assert finite.sum() == 254
    assert torch.equal(decoded.float()[finite] * 256, value[finite])
    assert torch.equal(decoded.float()[finite].signbit(), value[finite].signbit())  # -0 stays -0
    assert decoded.float()[~finite].tolist() == [1.875, -1.875]


@pytest.mark.parametrize("arch,as_bytes", [(80, True), (86, True), (89, False), (90, False)])
def test_fp8_weights_go_in_as_bytes_below_sm89(arch, as_bytes):
    """A100 / RTX 30xx read fp8 as bytes (Triton refuses fp8e4nv there); Ada and Hopper keep the hardware
    conversion; CPU tensors (the interpreter) keep float8."""
    T = masked_lora_triton
    assert T.reads_fp8_as_bytes(T.GpuTarget(arch, T.SMEM_LIMITS[arch])) is as_bytes
    assert T.reads_fp8_as_bytes(T.device_target(torch.device("cpu"))) is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fp8_byte_decode_gives_the_native_results_bit_for_bit(dtype, monkeypatch):
    """Same kernel, same shapes: the byte form computes x (w / 256) and multiplies the scales by 256, powers
    of two that round nowhere, so the forward and dX equal the float8 form's exactly. The spy checks that
    each form really reached the kernel (uint8 against float8_e4m3fn weights)."""
    x, w8, w_scale, b, lora_a, lora_b, s = fp8_inputs(dtype, 3, 4, "mixed")
    dy = torch.randn(BATCH, TOKENS, D_OUT, generator=torch.Generator().manual_seed(8)).to(dtype)
    weight_dtypes = []
    real_run = masked_lora_triton._fused_linear_kernel.run

    def spy(*args, **kwargs):
        weight_dtypes.append(dict(zip(masked_lora_triton._fused_linear_kernel.arg_names, args))["w_ptr"].dtype)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(masked_lora_triton._fused_linear_kernel, "run", spy)
    results = {}
    for backend in ("triton", "triton-bytes"):
        xg = x.detach().requires_grad_(True)
        y = masked_lora_linear(xg, w8, b, lora_a, lora_b, s, backend=fp8_backend(backend, monkeypatch),
                               weight_scale=w_scale)
        y.backward(dy)
        results[backend] = (y.detach(), xg.grad)
    fp8, byte = torch.float8_e4m3fn, torch.uint8
    assert weight_dtypes == [fp8, fp8, byte, byte]  # forward and dX per form
    assert torch.equal(results["triton"][0], results["triton-bytes"][0])
    assert torch.equal(results["triton"][1], results["triton-bytes"][1])


@pytest.mark.parametrize("backend", FP8_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scales", ["zero", "mixed"])
def test_fp8_weight_forward_matches_float64(backend, dtype, scales, poisoned_outputs, monkeypatch):
    backend = fp8_backend(backend, monkeypatch)
    x, w8, w_scale, b, lora_a, lora_b, s = fp8_inputs(dtype, 3, 4, scales)
    y = masked_lora_linear(x, w8, b, lora_a, lora_b, s, backend=backend, weight_scale=w_scale)
    assert y.dtype == dtype and y.shape == (BATCH, TOKENS, D_OUT)
    ref_inputs, ws64 = as_reference(x, w8, b, lora_a, lora_b, s), w_scale.double()  # fp8 is exact in float64
    want = reference(*ref_inputs, weight_scale=ws64)  # the slider term is added unscaled
    assert_within(y, want, error_bound(ref_inputs, FP8_ULPS[dtype], EPS[dtype], weight_scale=ws64), "y")


@pytest.mark.parametrize("backend", FP8_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_weight_gradients_match_float64(backend, dtype, poisoned_outputs, monkeypatch):
    """QLoRA-style: frozen fp8 base, trainable adapters; dX flows through the fp8 weight."""
    backend = fp8_backend(backend, monkeypatch)
    x, w8, w_scale, b, lora_a, lora_b, s = fp8_inputs(dtype, 2, 4)
    trainable = ("x", "lora_a", "lora_b")
    inputs = leaves((x, w8, b, lora_a, lora_b, s), trainable)
    dy = torch.randn(BATCH, TOKENS, D_OUT, generator=torch.Generator().manual_seed(5))
    got = grads(lambda x_, _w, b_, a_, bb_, s_: masked_lora_linear(
        x_, w8, b_, a_, bb_, s_, backend=backend, weight_scale=w_scale), inputs, dy.to(dtype))
    if backend == "triton":
        assert len(poisoned_outputs) == 4
    ref_inputs = as_reference(*inputs)
    fp8_reference = lambda *args: reference(*args, weight_scale=w_scale.double())
    want = grads(fp8_reference, leaves(ref_inputs, trainable), dy.double())
    bounds = grads(fp8_reference, leaves([None if t is None else t.abs() for t in ref_inputs], trainable),
                   dy.abs().double())
    ulps = FP8_ULPS[dtype] + (BATCH * TOKENS if dtype == torch.float32 else 2)
    for name in trainable:
        assert_within(got[name], want[name], ulps * EPS[dtype] * bounds[name], f"grad of {name}")


@pytest.mark.parametrize("backend", FP8_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_matches_float64(backend, dtype, poisoned_outputs, monkeypatch):
    backend = fp8_backend(backend, monkeypatch)
    x, w8, w_scale, b, *_ = fp8_inputs(dtype, 1, 4)
    x, b = x.detach().requires_grad_(True), b.detach().requires_grad_(True)
    y = fp8_linear(x, w8, w_scale, b, backend=backend)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(6)).to(dtype)
    y.backward(dy)
    if backend == "triton":
        assert len(poisoned_outputs) == 2, "Y and dX come from _empty, nothing else"

    w64, x64, b64 = dequantized(w8, w_scale), x.detach().double(), b.detach().double()
    n = D_IN if dtype == torch.float32 else 0
    assert_within(y, x64 @ w64.T + b64, (n + 3) * EPS[dtype] * (x64.abs() @ w64.abs().T + b64.abs()), "y")
    n = D_OUT if dtype == torch.float32 else 0
    want_dx = dy.double() @ w64
    assert_within(x.grad, want_dx, (n + 3) * EPS[dtype] * (dy.double().abs() @ w64.abs()), "dx")
    # db: an fp32 sum over the tokens, rounded once to b's dtype
    db_bound = (BATCH * TOKENS * EPS[torch.float32] + EPS[dtype]) * dy.double().abs().sum((0, 1))
    assert_within(b.grad, dy.double().sum((0, 1)), db_bound, "db")


def test_fp8_linear_without_bias_and_the_slider_path_agree():
    x, w8, w_scale, _, lora_a, lora_b, s = fp8_inputs(torch.bfloat16, 1, 4, "zero", bias=False)
    plain = fp8_linear(x, w8, w_scale, None, backend="triton")
    slider_off = masked_lora_linear(x, w8, None, lora_a, lora_b, s, backend="triton", weight_scale=w_scale)
    assert torch.equal(plain, slider_off)  # the same GEMM: zero scales add nothing


FP8_BAD = {
    "fp8 without scale": (TypeError, "needs weight_scale", lambda i: dict(weight=i["w8"], weight_scale=None)),
    "scale on bf16 weight": (TypeError, "weight_scale is for float8", lambda i: dict(weight=i["w8"].float())),
    "scale shape": (ValueError, "weight_scale must be float32 \\(d_out=45,\\)",
                    lambda i: dict(weight_scale=i["w_scale"][:-1])),
    "scale dtype": (ValueError, "weight_scale must be float32", lambda i: dict(weight_scale=i["w_scale"].double())),
}


@pytest.mark.parametrize("case", list(FP8_BAD))
def test_fp8_bad_inputs_raise_clear_errors(case):
    error, message, change = FP8_BAD[case]
    x, w8, w_scale, b, lora_a, lora_b, s = fp8_inputs(torch.float32, 2, 3)
    args = {"weight": w8, "weight_scale": w_scale} | change({"w8": w8, "w_scale": w_scale})
    with pytest.raises(error, match=message):
        masked_lora_linear(x, args["weight"], b, lora_a, lora_b, s, backend="torch", weight_scale=args["weight_scale"])


def test_fp8_linear_errors():
    x, w8, w_scale, b, *_ = fp8_inputs(torch.float32, 1, 4)
    with pytest.raises(TypeError, match="fp8_linear: weight must be float8_e4m3fn"):
        fp8_linear(x, w8.float(), w_scale, b)
    with pytest.raises(TypeError, match="fp8_linear: weight_scale is required"):
        fp8_linear(x, w8, None, b)
    with pytest.raises(ValueError, match="fp8_linear: weight must be \\(d_out, d_in=51\\)"):
        fp8_linear(x, w8[:, :-1], w_scale, b)


# -- cards the Triton kernels cannot serve (faked on the CPU) ----------------------------------------------

T4_PROBLEM = "Tesla T4 is sm_75; the Triton kernels need sm_80 or newer (bf16 tensor cores)"


@pytest.fixture
def fresh_cards(monkeypatch, tmp_path):
    """No card checked or warned about yet in this process, and a dispatcher with its own cache file that
    must not time anything (the tests here never reach a decision by timing)."""
    monkeypatch.setattr(masked_lora, "_TRITON_PROBLEMS", {})
    monkeypatch.setattr(masked_lora, "_WARNED_DEVICES", set())
    monkeypatch.setattr(masked_lora, "_DEVICE_NAMES", {})

    def no_timing(fn, device):
        raise AssertionError("the dispatcher timed a backend on a card the Triton kernels cannot serve")

    fresh = dispatch.Dispatcher(tmp_path / "lora_dispatch.json", timer=no_timing, flush=lambda device: None)
    previous = dispatch.use_dispatcher(fresh)
    yield tmp_path / "lora_dispatch.json"
    dispatch.use_dispatcher(previous)


def test_cards_below_sm80_are_named_with_the_reason(fresh_cards, monkeypatch):
    cards = {0: ("Tesla T4", (7, 5)), 1: ("NVIDIA A100-SXM4-80GB", (8, 0)), 2: ("NVIDIA GeForce RTX 3090", (8, 6))}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: cards[torch.device(device).index][0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cards[torch.device(device).index][1])
    assert masked_lora.triton_problem(torch.device("cuda", 0)) == T4_PROBLEM
    assert masked_lora.triton_problem(torch.device("cuda", 1)) is None
    assert masked_lora.triton_problem(torch.device("cuda", 2)) is None
    assert masked_lora.triton_problem(torch.device("cpu")) is None  # the interpreter


def no_triton_launches(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a Triton kernel was launched")

    monkeypatch.setattr(masked_lora_triton, "scaled_shrink", fail)
    monkeypatch.setattr(masked_lora_triton, "fused_linear", fail)


def fp8_and_slider_calls(backend):
    """A slider layer (forward and backward) at two token counts, then an fp8_linear: several dispatch keys."""
    outputs = []
    for tokens in (TOKENS, 3):
        x, weight, bias, lora_a, lora_b, s = make_inputs(torch.bfloat16, 2, 4, "mixed")
        x = x[:, :tokens].detach().requires_grad_(True)
        y = masked_lora_linear(x, weight, bias, lora_a, lora_b, s[:, :tokens], backend=backend)
        y.backward(torch.ones_like(y))
        outputs += [y, x.grad]
    x, w8, w_scale, b, *_ = fp8_inputs(torch.bfloat16, 1, 4)
    return outputs + [fp8_linear(x, w8, w_scale, b, backend=backend)]


def test_auto_on_a_card_below_sm80_is_the_pytorch_path_after_one_warning(fresh_cards, monkeypatch):
    monkeypatch.setattr(masked_lora, "_card_problem", lambda device: T4_PROBLEM)
    expected = fp8_and_slider_calls("torch")
    no_triton_launches(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = fp8_and_slider_calls("auto")
    assert [str(w.message) for w in caught] == [
        f"masked_lora_linear: the Triton kernels are off on cpu: {T4_PROBLEM}. Every adapted and fp8 layer "
        "takes the PyTorch path there (fp8 weights are dequantized on every call)"]
    assert caught[0].filename == __file__  # it points at the caller of masked_lora_linear
    assert all(torch.equal(a, b) for a, b in zip(outputs, expected, strict=True))
    assert dispatch.decisions() == [] and not fresh_cards.exists()  # nothing measured, nothing cached


def test_forced_triton_on_a_card_below_sm80_is_an_error_before_any_launch(fresh_cards, monkeypatch):
    monkeypatch.setattr(masked_lora, "_card_problem", lambda device: T4_PROBLEM)
    no_triton_launches(monkeypatch)
    inputs = make_inputs(torch.bfloat16, 2, 4)
    forced = f"masked_lora_linear: the triton backend .* cannot run on cpu: {re.escape(T4_PROBLEM)}"
    with pytest.raises(ValueError, match=forced):
        masked_lora_linear(*inputs, backend="triton")
    x, w8, w_scale, b, *_ = fp8_inputs(torch.bfloat16, 1, 4)
    with pytest.raises(ValueError, match=f"fp8_linear: the triton backend .* {re.escape(T4_PROBLEM)}"):
        fp8_linear(x, w8, w_scale, b, backend="triton")


def fp8e4nv_build_error():
    """The CompilationError Triton raises for fp8 weights on sm_86 (before the byte decode), as it reads."""
    src = "def _fused_linear_kernel(\n    x_ptr, w_ptr,\n):\n    pass"
    node = ast.parse(src).body[0]
    reason = ('ValueError("type fp8e4nv not supported in this architecture. The supported fp8 dtypes are '
              "('fp8e4b15', 'fp8e5')\")")
    return triton.compiler.errors.CompilationError(src, node, reason)


def raising(error: Exception, calls: list | None = None):
    """A stand-in for masked_lora_triton.masked_lora that fails as Triton would, counting its calls."""
    def fail(*args, **kwargs):
        if calls is not None:
            calls.append(args)
        raise error

    return fail


def test_a_triton_that_cannot_build_the_kernels_costs_one_warning_and_no_cache_entry(fresh_cards, monkeypatch):
    """The first build failure turns the Triton path off for the card: one warning with the whole reason (not
    'at 1:0:'), no decision for the shape on disk (a fixed Triton tries again), no further builds."""
    expected = fp8_and_slider_calls("torch")
    builds = []
    monkeypatch.setattr(masked_lora_triton, "masked_lora", raising(fp8e4nv_build_error(), builds))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = fp8_and_slider_calls("auto")
    assert len(builds) == 1
    (warning,) = caught
    assert str(warning.message).startswith(
        f"masked_lora_linear: the Triton kernels are off on cpu: triton {triton.__version__} cannot build them for "
        "cpu: CompilationError: ValueError(\"type fp8e4nv not supported in this architecture. The supported fp8 "
        "dtypes are ('fp8e4b15', 'fp8e5')\"). Every adapted")
    assert all(torch.equal(a, b) for a, b in zip(outputs, expected, strict=True))
    assert dispatch.decisions() == [] and not fresh_cards.exists()
    with pytest.raises(ValueError, match="the triton backend .* cannot build them"):
        masked_lora_linear(*make_inputs(torch.bfloat16, 2, 4), backend="triton")


def test_a_build_failure_on_a_decided_key_also_turns_the_card_off(fresh_cards, monkeypatch):
    """A key decided for Triton whose next call fails to build (a new specialisation; the first call of a
    choice read from disk): the card goes off with its one warning and the call gets the PyTorch path."""
    times = iter([1e-3, 2e-3])  # one round, Triton timed first: Triton wins

    def triton_faster(fn, device):
        fn()
        return next(times)

    dispatch.use_dispatcher(dispatch.Dispatcher(fresh_cards, timer=triton_faster, flush=lambda device: None,
                                                reps=1, min_reps=1))
    inputs = make_inputs(torch.bfloat16, 2, 4)
    masked_lora_linear(*inputs, backend="auto")
    assert [d["backend"] for d in dispatch.decisions()] == ["triton"]
    monkeypatch.setattr(masked_lora_triton, "masked_lora", raising(fp8e4nv_build_error()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = masked_lora_linear(*inputs, backend="auto")
    (warning,) = caught
    assert "the Triton kernels are off on cpu: triton" in str(warning.message)
    assert "type fp8e4nv not supported" in str(warning.message)
    assert torch.equal(y, masked_lora_linear(*inputs, backend="torch"))


def test_a_failure_on_one_shape_stays_with_that_shape(fresh_cards, monkeypatch):
    """Out of shared memory (or any launch error) is a verdict on one shape: the dispatcher's, per key."""
    monkeypatch.setattr(masked_lora_triton, "masked_lora",
                        raising(triton.runtime.errors.OutOfResources(262_144, 232_448, "shared memory")))
    inputs = make_inputs(torch.bfloat16, 2, 4)
    per_key = "the Triton path is not used for cpu\\|forward.*: OutOfResources: out of resource: shared memory"
    with pytest.warns(RuntimeWarning, match=per_key):
        masked_lora_linear(*inputs, backend="auto")
    assert masked_lora.triton_problem(torch.device("cpu")) is None
    assert [d["backend"] for d in dispatch.decisions()] == ["torch"]
