"""What one adapted layer's PyTorch path costs per call beyond its base linear, counted with a
TorchDispatchMode (benchmarks/op_counts.py's OpCounter: ATen ops, views and detach left out).

Beyond the base linear (nn.Linear, or Fp8Linear's own dequantize-and-GEMM), a cached inference call
issues x A^T (mm), the scale (mul_) and the expand GEMM into the base output (addmm_): 3 ops, whatever
the number of sliders and their ranks. A hard token mask (some scale 0) adds masked_fill_: 0 * inf and
0 * NaN are NaN, so no multiply gives the exact 0 that masked_lora_reference promises for a zero scale
where x A^T is inf or NaN (tests/test_masked_lora.py poisons A to check it), and that 4th op is the
least the mask costs: the comparison with 0 is kept with the scales between calls.
"""
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

from slideredit.quantization import Fp8Linear
from slideredit.sliders import GSTLORA, STLORA, Adapter, LoRAPart, SliderLinear, set_slider_scale

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import op_counts  # noqa: E402
from op_counts import OpCounter  # noqa: E402

D, T = 16, 10
RANKS = {GSTLORA: 2, STLORA: 3}  # unequal: the smaller stack is zero-padded


def layer_with(names: tuple[str, ...], fp8: bool) -> SliderLinear:
    """An fp32 q/k/v-like layer (d -> 3d, bias), fp8 weight or not, with 3-part adapters `names`."""
    g = torch.Generator().manual_seed(0)
    base = nn.Linear(D, 3 * D)
    layer = SliderLinear(Fp8Linear.from_linear(base) if fp8 else base).requires_grad_(False)
    for name in names:
        r = RANKS[name]
        layer.adapters[name] = Adapter({
            p: LoRAPart(torch.randn(r, D, generator=g), torch.randn(D, r, generator=g), i * D, (i + 1) * D)
            for i, p in enumerate("qkv")}).requires_grad_(False)
    return layer


def text_scale(masked: bool) -> torch.Tensor:
    """STLoRA's per-token scale on (1, T): 0.8 on a span, and 0 (a hard mask) or -0.3 elsewhere."""
    scale = torch.full((1, T), 0.0 if masked else -0.3)
    scale[:, 2:6] = 0.8
    return scale


def non_view_ops(fn) -> Counter:
    with OpCounter() as counter:
        fn()
    return counter.non_view


@pytest.mark.parametrize("fp8", [False, True], ids=["fp32", "fp8"])
@pytest.mark.parametrize("names", [(STLORA,), (GSTLORA, STLORA)], ids=["1 slider", "2 sliders"])
@pytest.mark.parametrize("masked", [False, True], ids=["no zero scale", "hard token mask"])
def test_an_adapted_layer_costs_3_ops_beyond_its_base_and_a_hard_mask_one_more(fp8, names, masked):
    layer = layer_with(names, fp8)
    set_slider_scale(layer, STLORA, text_scale(masked))
    if GSTLORA in names:
        set_slider_scale(layer, GSTLORA, 0.7)
    base, x = layer.to_linear(), torch.randn(1, T, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer(x)  # builds the stack: later calls reuse it
        layer_ops, base_ops = non_view_ops(lambda: layer(x)), non_view_ops(lambda: base(x))
    assert sum(base_ops.values()) == (3 if fp8 else 1)  # fp8: cast, row scales, GEMM; else the GEMM
    assert not base_ops - layer_ops, "the base linear's own ops are all there"
    extra = layer_ops - base_ops
    mask = Counter({"aten.masked_fill_": 1}) if masked else Counter()
    assert extra == Counter({"aten.mm": 1, "aten.mul_": 1, "aten.addmm_": 1}) + mask
    assert sum(extra.values()) <= (4 if masked else 3)


def test_the_benchmark_reports_3_beyond_the_linear_and_4_with_a_hard_mask():
    """op_counts.py's table, per case: the adapters' non-view ops per cached call beyond the linear."""
    want = {"GSTLoRA, 3-part qkv (alpha 0.7)": 3, "GSTLoRA, single-part mlp.0 (alpha 0.7)": 3,
            "GSTLoRA, linear1 q/k/v rows (alpha 0.7)": 3, "STLoRA, 3-part txt qkv (one span)": 4,
            "GSTLoRA + STLoRA, txt qkv": 4, "GSTLoRA, 3-part qkv, fp8 weight (alpha 0.7)": 3,
            "GSTLoRA + STLoRA, txt qkv, fp8 weight": 4, "GSTLoRA, 3-part qkv, alpha 0": 0,
            "GSTLoRA, 3-part qkv, switched off": 0}
    rows = op_counts.table()[2:]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == list(want)
    assert [int(row.rstrip(" |").rsplit(" | ", 1)[1]) for row in rows] == list(want.values())
