"""Precision of the low-memory (fp8) mode, on the CPU.

1. A real layer size (3072 x 3072, rank 16, |alpha B A| ~ 1e-3 |W| at alpha 1): the output error of a
   slider merged into bf16 or fp8 weights and of the unfused slider on bf16 or fp8 weights, against the
   float64 truth, for alpha from 0.05 to 1. Two measures: the whole output's relative error, and the
   slider's own effect, (y(alpha) - y(0)) against the true alpha x (B A)^T. GEMMs run in float64 on the
   stored operands, so the table shows what the weights' storage does (bf16 activations add their own
   output rounding, 2^-9 per element, the same for every variant; printed as a last row).
2. The tiny random FLUX (tests' presets): velocity relative error in fp8 vs fp32, with and without the
   modulation linears and the embedders quantized: the measurement behind fp8_targets' choice.
3. The autoencoder's peak live activation memory at FLUX's widths (encode, decode untiled and in strips),
   traced tensor by tensor beside the memory plan's estimate (decoder_memory says how).
4. A full-size stand-in: FLUX.1 Kontext [dev]'s blocks at full width with random weights (a subset of
   the 57 blocks, streamed one at a time), velocity error of fp8 and bf16 against fp32.

    python benchmarks/fp8_precision.py                       # all four (about 5 minutes on 2 cores)
    python benchmarks/fp8_precision.py --full-size-only --double 3 --single 6
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import sys
import weakref
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from slideredit import memory_plan, strip_decoding  # noqa: E402
from slideredit.autoencoder import AutoEncoder, AutoEncoderParams  # noqa: E402
from slideredit.quantization import FP8, fp8_targets, quantize_model, quantize_rows  # noqa: E402
from slideredit.transformer import DoubleStreamBlock, Flux, FluxParams, SingleStreamBlock  # noqa: E402

ALPHAS = (0.05, 0.1, 0.25, 0.5, 1.0)


def layer_table(d: int = 3072, rank: int = 16, tokens: int = 256, ratio: float = 1e-3) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)  # std 0.018, as FLUX's linears
    a = torch.randn(rank, d, generator=g, dtype=torch.float64)
    b = torch.randn(d, rank, generator=g, dtype=torch.float64)
    b *= ratio * w.norm() / (b @ a).norm()  # ||B A||_F = 1e-3 ||W||_F
    x = torch.randn(tokens, d, generator=g).bfloat16().double()  # activations as a bf16 model holds them

    bf16 = lambda m: m.bfloat16().double()
    fp8 = lambda m: (lambda q, s: q.double() * s.double()[:, None])(*quantize_rows(m.float()))
    a32, b32 = a.float().double(), b.float().double()  # the adapter is held in fp32
    y0_true = x @ w.T
    variants = {
        "bf16-merged": lambda al: x @ bf16(w + al * b @ a).T,
        "fp8-merged": lambda al: x @ fp8(w + al * b @ a).T,
        "unfused on bf16 W": lambda al: x @ bf16(w).T + al * (x @ a32.T) @ b32.T,
        "unfused on fp8 W": lambda al: x @ fp8(w).T + al * (x @ a32.T) @ b32.T,
    }
    print(f"\n## 1. Layer {d} x {d}, rank {rank}, ||alpha B A|| = {ratio:g} ||W|| at alpha 1, {tokens} tokens")
    header = "| variant | measure | " + " | ".join(f"alpha {al:g}" for al in ALPHAS) + " |"
    print(header + "\n|" + "---|" * (2 + len(ALPHAS)))
    for name, run in variants.items():
        base = run(0.0)
        total, effect = [], []
        for al in ALPHAS:
            y_true, y = y0_true + al * (x @ (b @ a).T), run(al)
            delta_true = al * (x @ (b @ a).T)
            total.append((y - y_true).norm() / y_true.norm())
            effect.append(((y - base) - delta_true).norm() / delta_true.norm())
        print(f"| {name} | output error | " + " | ".join(f"{v:.2e}" for v in total) + " |")
        print(f"| {name} | slider-effect error | " + " | ".join(f"{v:.2e}" for v in effect) + " |")
    effect = []
    for al in ALPHAS:  # bf16 activations: the layer's output itself is rounded to bf16
        delta_true = al * (x @ (b @ a).T)
        y = bf16(y0_true + delta_true) - bf16(y0_true)
        effect.append((y - delta_true).norm() / delta_true.norm())
    print("| bf16 output rounding alone | slider-effect error | " + " | ".join(f"{v:.2e}" for v in effect) + " |")


def tiny_flux() -> None:
    from flux_sizes import SMALL_FLUX, TINY_FLUX
    from tiny_kontext import randomize_
    from test_transformer import kontext_inputs

    print("\n## 2. Tiny random FLUX, velocity relative error in fp8 vs fp32")
    print("| preset | attention + MLP linears | + modulation (default) | + embedders and final layer |\n|---|---|---|---|")
    for preset, params in (("tiny", TINY_FLUX), ("small", SMALL_FLUX)):
        model = randomize_(Flux(params), 3).eval()
        inputs = kontext_inputs(params)
        embedders = ["img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer",
                     "vector_in.out_layer", "guidance_in.in_layer", "guidance_in.out_layer", "final_layer.linear",
                     "final_layer.adaLN_modulation.1"]
        choices = [fp8_targets(model, modulation=False), fp8_targets(model), fp8_targets(model) + embedders]
        errors = []
        with torch.no_grad():
            reference = model(**inputs)
            for names in choices:
                out = quantize_model(copy.deepcopy(model), names)(**inputs)
                errors.append(((out - reference).norm() / reference.norm()).item())
        print(f"| {preset} | " + " | ".join(f"{e:.4f}" for e in errors) + " |")
    print("(e4m3's RMS error per element for evenly spread mantissas: 2^-3 / sqrt(12) * sqrt(1/2) = 0.0255)")


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages alive at once among those created inside the mode; the parameters and
    buffers of `existing` modules and `existing` tensors (made before) are left out. A storage lives as
    long as any tensor the mode saw on it (its views included: a view can outlive the tensor it was taken
    from, as the attention output's merged heads do)."""

    def __init__(self, *existing: torch.Tensor | torch.nn.Module):
        super().__init__()
        self.live, self.peak = 0, 0
        self.holders: dict[int, int] = {}  # storage address -> tensors alive on it
        self.ignored = {t.untyped_storage().data_ptr() for item in existing
                        for t in ([*item.parameters(), *item.buffers()] if isinstance(item, torch.nn.Module) else [item])}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if key in self.ignored or not nbytes:
                    continue
                if key not in self.holders:
                    self.holders[key] = 0
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                self.holders[key] += 1
                weakref.finalize(t, self._release, key, nbytes)
        return out

    def _release(self, key: int, nbytes: int) -> None:
        self.holders[key] -= 1
        if not self.holders[key]:
            del self.holders[key]
            self.live -= nbytes


@contextlib.contextmanager
def traced_strip_ops(model: torch.nn.Module) -> Iterator[list[int]]:
    """While open, every op that decode_tiled maps over strips is traced: yields the list collecting each
    op's peak (its input strips, moved to the device, plus what the op creates)."""
    op_peaks: list[int] = []
    plain_map_strips = strip_decoding.map_strips

    def traced_map_strips(op, inputs, *args, **kwargs):
        def traced(*strips):
            with LiveBytes(model, *strips) as live:
                out = op(*strips)
            op_peaks.append(live.peak + sum(s.nbytes for s in strips))
            return out
        return plain_map_strips(traced, inputs, *args, **kwargs)

    strip_decoding.map_strips = traced_map_strips
    try:
        yield op_peaks
    finally:
        strip_decoding.map_strips = plain_map_strips


def decoder_memory(size: int = 256, rows: int = 8) -> None:
    """The autoencoder's device activations in bf16 at 1024^2, traced (every tensor the ops create, the
    weights and inputs left out) beside the memory plan's estimate from shapes (slideredit/memory_plan.py).
    Untiled (decode) and the encoder at size^2, scaled to 1024^2 by the pixel count (activations scale
    with it). Strips (decode_tiled): the device holds the mid block's tensors (whole, at the latent
    resolution; at size^2, scaled the same way) or one op's strips: its input strips plus the tensors it
    creates, traced for every op of a 1024-pixel-wide image (a strip's working set depends on the width,
    not the height). The host buffers between ops are not device memory and are left out."""
    params = AutoEncoderParams.flux()
    model = AutoEncoder(params).to(torch.bfloat16).eval()
    z = torch.randn(1, 16, size // 8, size // 8, dtype=torch.bfloat16)
    pixels = torch.randn(1, 3, size, size, dtype=torch.bfloat16)
    scale = (1024 / size) ** 2
    print("\n## 3. FLUX autoencoder peak live activations (1024^2 bf16), traced and planned")
    with torch.no_grad(), LiveBytes(model, pixels) as mode:
        model.encode(pixels)
    encoded = mode.peak * scale
    with torch.no_grad(), LiveBytes(model, z) as mode:
        model.decode(z)
    untiled = mode.peak * scale
    with torch.no_grad(), LiveBytes(model, z) as mode:
        model.decoder.mid(model.decoder.conv_in(z))
    mid = mode.peak * scale

    with torch.no_grad(), traced_strip_ops(model) as op_peaks:
        model.decode_tiled(torch.randn(1, 16, 4 * rows, 1024 // 8, dtype=torch.bfloat16), rows=rows)
    e = 2
    planned_strips = memory_plan.strip_decode_bytes(params, 1024, 1024, e, rows)
    print("| activations | traced | planned |\n|---|---|---|")
    print(f"| encode, one image | {encoded / 1e9:.3f} GB | "
          f"{(memory_plan.encode_bytes(params, 1024, 1024, e) - 3 * 1024**2 * e) / 1e9:.3f} GB (less the image) |")
    print(f"| decode, untiled | {untiled / 1e9:.3f} GB | {memory_plan.decode_bytes(params, 1024, 1024, e) / 1e9:.3f} GB |")
    print(f"| decode_tiled: mid block (whole) | {mid / 1e9:.3f} GB | "
          f"{memory_plan.mid_attention_bytes(params, 1024, 1024, e) / 1e9:.3f} GB |")
    print(f"| decode_tiled: largest op over a strip of {rows} latent rows | {max(op_peaks) / 1e9:.3f} GB | |")
    print(f"| decode_tiled: the larger of the two | {max(mid, *op_peaks) / 1e9:.3f} GB | {planned_strips / 1e9:.3f} GB |")


class BuiltOnCall(torch.nn.Module):
    """Stands in for one block of a full-size model: builds it when called, runs it, keeps its output in
    `outputs` and drops it (only `build`'s cache, if any, stays in memory)."""

    def __init__(self, build: Callable[[], torch.nn.Module], outputs: list):
        super().__init__()
        self.build, self.outputs = build, outputs

    def forward(self, *args):
        out = self.build()(*args)
        self.outputs.append(out)
        return out


def cast_keeping_fp8(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """module.to(dtype) would turn fp8 weights into `dtype` too: cast everything else only."""
    for t in module.parameters():
        if t.dtype != FP8:
            t.data = t.data.to(dtype)
    return module


def full_size_flux(double: int = 3, single: int = 6, text_len: int = 64, side: int = 16) -> None:
    """FLUX.1 Kontext [dev]'s blocks at full width (3072, 24 heads, MLP 12288), `double` double and
    `single` single blocks of the real 19 and 38, random weights as section 2's tiny model has them
    (tests' randomize_: N(0, 1 / fan_in), then rounded to bf16 as the checkpoint stores them), on text_len text and
    2 x side^2 image tokens (a (16 side)^2 edit). Velocity and residual-stream relative RMS error against
    fp32 of: bf16; fp8 block linears (quantized from the bf16 weights as load_flux does) with fp32 and
    with bf16 activations (the pipeline's low-memory mode). Each block's bf16 and fp8 weights are made once
    and shared by the variants; a stand-in for the trained model, whose weights are not random."""
    from test_transformer import kontext_inputs
    from tiny_kontext import randomize_

    p = replace(FluxParams.kontext_dev(), depth=double, depth_single_blocks=single)
    masters: dict[tuple[str, int], tuple[torch.nn.Module, torch.nn.Module]] = {}

    def master(kind: str, i: int) -> tuple[torch.nn.Module, torch.nn.Module]:
        """Block i's bf16 weights and their fp8 quantization, made once."""
        if (kind, i) not in masters:
            with torch.device("meta"):
                block = DoubleStreamBlock(p.hidden_size, p.num_heads, p.mlp_hidden_dim, p.qkv_bias) if kind == "double" \
                    else SingleStreamBlock(p.hidden_size, p.num_heads, p.mlp_hidden_dim)
            block = randomize_(block.to_empty(device="cpu"), seed=(100 if kind == "double" else 200) + i)
            block = block.to(torch.bfloat16).eval()
            linears = [name for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
            masters[kind, i] = block, quantize_model(copy.deepcopy(block), linears)
        return masters[kind, i]

    variants = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, False),
                "fp8 block linears, fp32 activations": (torch.float32, True),
                "fp8 block linears, bf16 activations (low-memory mode)": (torch.bfloat16, True)}
    # timestep 0.25 and guidance 2: their x1000 are exact in bf16 (BFL scales them in the model's dtype, so
    # 2.5 would be a different guidance in bf16, not a rounding of the same computation)
    inputs = {**kontext_inputs(p, batch=1, text_len=text_len, height=side, width=side),
              "timesteps": torch.tensor([0.25]), "guidance": torch.tensor([2.0])}
    velocity, stream = {}, {}
    for name, (dtype, fp8) in variants.items():
        outputs = []

        def build(kind: str, i: int, dtype=dtype, fp8=fp8) -> torch.nn.Module:
            weights = master(kind, i)[int(fp8)]
            return cast_keeping_fp8(copy.deepcopy(weights), dtype) if dtype != torch.bfloat16 else weights

        with torch.device("meta"):
            model = Flux(p)
        model.double_blocks = torch.nn.ModuleList(BuiltOnCall(lambda i=i: build("double", i), outputs) for i in range(double))
        model.single_blocks = torch.nn.ModuleList(BuiltOnCall(lambda i=i: build("single", i), outputs) for i in range(single))
        model = randomize_(model.to_empty(device="cpu"), seed=0).to(torch.bfloat16).to(dtype).eval()
        with torch.no_grad():
            velocity[name] = model(**{k: v.to(dtype) for k, v in inputs.items()}).double()
        stream[name] = [torch.cat(out, dim=1).double() if isinstance(out, tuple) else out.double() for out in outputs]

    def error(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm()).item()

    tokens = text_len + 2 * side * side
    print(f"\n## 4. Full-size stand-in: {double} double + {single} single blocks of FLUX.1 Kontext [dev] at full "
          f"width, random weights, {tokens} tokens; relative RMS error against fp32")
    print("| variant | residual stream after each block | velocity |\n|---|---|---|")
    for name in list(variants)[1:]:
        after = " ".join(f"{error(a, b):.4f}" for a, b in zip(stream[name], stream["fp32"]))
        print(f"| {name} | {after} | {error(velocity[name], velocity['fp32']):.4f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-size-only", action="store_true", help="only part 4")
    parser.add_argument("--double", type=int, default=3, help="part 4's double blocks (the real model: 19)")
    parser.add_argument("--single", type=int, default=6, help="part 4's single blocks (the real model: 38)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if not args.full_size_only:
        layer_table()
        tiny_flux()
        decoder_memory()
    full_size_flux(args.double, args.single)
