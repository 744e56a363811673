"""ATen operations issued by one call of an adapted layer (SliderLinear), counted with a dispatch mode.

Op counts are deterministic (unlike timings), so they show per-call waste exactly: every op below
autograd is one dispatcher call, and on a GPU each non-view op is usually one kernel launch.

Columns, per layer structure (width 64; the counts do not depend on the width):
  linear     the module the layer replaced (nn.Linear, or Fp8Linear for an fp8 weight): the floor
  restack    the layer with its adapters stacked again on every call (what every call did before the
             cache, and what a training forward still does, inside the autograd graph)
  cached     the layer as inference runs it now: stacked A/B, token scales and where they are 0 reused
             between calls
  beyond     cached minus linear, non-view ops: what the adapters cost per call. 3 (mm, mul_, addmm_)
             where no token scale is 0; 4 with a hard token mask (masked_fill_: no multiply turns an inf
             or NaN of x A^T into the 0 a zero scale promises); 0 when no adapter adds anything
Each as "all ops / non-view ops" except beyond. The CPU's PyTorch path of the kernel is counted; on CUDA
the Triton path replaces the shrink and GEMM ops with two launches, the stacking ops are the same.

    python benchmarks/op_counts.py
"""
from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from slideredit.quantization import Fp8Linear
from slideredit.sliders import GSTLORA, STLORA, Adapter, LoRAPart, SliderLinear

HIDDEN, TOKENS = 64, 24


class OpCounter(TorchDispatchMode):
    """Counts every ATen op dispatched inside the `with` block: `ops` by name, `views` those that alias
    (views, transposes, detach: metadata only), `non_view` the others by name (the ones that launch work)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.non_view: Counter[str] = Counter()
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.ops[name] += 1
        if func.is_view:
            self.views += 1
        else:
            self.non_view[name] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], object]) -> tuple[int, int]:
    """-> (all ops, non-view ops) of one call of fn."""
    with OpCounter() as counter:
        fn()
    total = sum(counter.ops.values())
    return total, total - counter.views


def make_layer(d_in: int, d_out: int, adapters: dict[str, tuple[tuple[str, int, int], ...]], rank: int = 16,
               seed: int = 0, fp8: bool = False) -> SliderLinear:
    """A SliderLinear on a random nn.Linear (quantized to an Fp8Linear if fp8); adapters[name] = ((part,
    first row, end row), ...)."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(d_in, d_out)
    layer = SliderLinear(Fp8Linear.from_linear(base) if fp8 else base).requires_grad_(False)
    for name, parts in adapters.items():
        layer.adapters[name] = Adapter({
            part: LoRAPart(torch.randn(rank, d_in, generator=g), torch.randn(end - start, rank, generator=g), start, end)
            for part, start, end in parts}).requires_grad_(False)
    return layer


def cases() -> dict[str, tuple[SliderLinear, dict[str, object]]]:
    """name -> (layer, {adapter: scale}): the layer structures of FLUX.1 Kontext at a small width."""
    d = HIDDEN
    qkv = (("q", 0, d), ("k", d, 2 * d), ("v", 2 * d, 3 * d))
    text_scale = torch.zeros(1, TOKENS)
    text_scale[:, 3:9] = 0.8  # one STLoRA sub-prompt span
    return {
        "GSTLoRA, 3-part qkv (alpha 0.7)": (make_layer(d, 3 * d, {GSTLORA: qkv}), {GSTLORA: 0.7}),
        "GSTLoRA, single-part mlp.0 (alpha 0.7)": (make_layer(d, 4 * d, {GSTLORA: (("all", 0, 4 * d),)}),
                                                   {GSTLORA: 0.7}),
        "GSTLoRA, linear1 q/k/v rows (alpha 0.7)": (make_layer(d, 7 * d, {GSTLORA: qkv}), {GSTLORA: 0.7}),
        "STLoRA, 3-part txt qkv (one span)": (make_layer(d, 3 * d, {STLORA: qkv}), {STLORA: text_scale}),
        "GSTLoRA + STLoRA, txt qkv": (make_layer(d, 3 * d, {GSTLORA: qkv, STLORA: qkv}),
                                      {GSTLORA: 0.7, STLORA: text_scale}),
        "GSTLoRA, 3-part qkv, fp8 weight (alpha 0.7)": (make_layer(d, 3 * d, {GSTLORA: qkv}, fp8=True),
                                                        {GSTLORA: 0.7}),
        "GSTLoRA + STLoRA, txt qkv, fp8 weight": (make_layer(d, 3 * d, {GSTLORA: qkv, STLORA: qkv}, fp8=True),
                                                  {GSTLORA: 0.7, STLORA: text_scale}),
        "GSTLoRA, 3-part qkv, alpha 0": (make_layer(d, 3 * d, {GSTLORA: qkv}), {GSTLORA: 0.0}),
        "GSTLoRA, 3-part qkv, switched off": (make_layer(d, 3 * d, {GSTLORA: qkv}), {GSTLORA: None}),
    }


def set_scales(layer: SliderLinear, scales: dict[str, object]) -> None:
    for name, scale in scales.items():
        value = None if scale is None else torch.as_tensor(scale, dtype=torch.float32)
        layer.adapters[name].scale = None if value is None else value.reshape(1, 1) if value.ndim == 0 else value


def layer_counts(layer: SliderLinear, scales: dict[str, object]) -> dict[str, tuple[int, int]]:
    """{"linear", "restack", "cached"} -> (all, non-view) ops of one no-grad call on (1, TOKENS, d_in)."""
    set_scales(layer, scales)
    x = torch.randn(1, TOKENS, layer.in_features)
    on = [a for a in layer.adapters.values() if a.scale is not None]
    linear = layer.to_linear()
    with torch.no_grad():
        layer(x)  # builds the cache: the first call after a change pays for the stacking
        return {"linear": count_ops(lambda: linear(x)),
                "restack": count_ops(lambda: layer._lora(x, *layer._stack.restack(on, x))) if on else count_ops(lambda: linear(x)),
                "cached": count_ops(lambda: layer(x))}


def table() -> list[str]:
    lines = ["| layer | linear | restack every call (before) | cached (now) | beyond the linear |",
             "|---|---|---|---|---|"]
    for name, (layer, scales) in cases().items():
        c = layer_counts(layer, scales)
        lines.append(f"| {name} | " + " | ".join(f"{c[k][0]} / {c[k][1]}" for k in ("linear", "restack", "cached"))
                     + f" | {c['cached'][1] - c['linear'][1]} |")
    return lines


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print(f"ATen ops per call (all / non-view), torch {torch.__version__}, CPU PyTorch path, x (1, {TOKENS}, d_in)")
    print("\n".join(table()))


if __name__ == "__main__":
    main()
