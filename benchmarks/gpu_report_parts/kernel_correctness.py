"""The fused Triton kernel against fp32 math at every adapted layer shape.

bf16 and fp16 weights: M = 8704 (joint tokens) and 512 (text tokens), K = 1, 2, 4, r = 16, 32, forward and
backward. fp8 weights (float8_e4m3fn + row scales, weight_scale=): every layer shape, both M, K = 2,
r = 16, bf16 and fp16 x, forward and backward (dX, dA, dB) against fp32 math on the dequantized weight.
"""
from __future__ import annotations

import torch
from torch import Tensor

from bench_lora import SPAN_LEN, make_set
from gpu_report_parts.measure import error_text, free_memory, out_of_time
from gpu_report_parts.setups import Part, Setup, dtype_name
from slideredit.kernels.masked_lora import masked_lora_linear
from slideredit.quantization import dequantize, quantize_rows

# Agreement with fp32 math, relative to the output's scale: 4 units of the dtype's precision (both sides
# accumulate in fp32 from the same rounded inputs; ours rounds the output and H~ once).
TOLERANCE = {torch.bfloat16: 4 * 2.0**-7, torch.float16: 4 * 2.0**-10}


def measure(setup: Setup, deadline: float) -> Part:
    """bf16 / fp16 weights at every case, then fp8 weights (float8_e4m3fn + row scales) at every layer shape
    with the two sliders' K: the fp8 cases are few and cheap, so they share the slot without a reserve."""
    rows, notes, skipped = [], [], 0
    cases = [(r, dtype, M, name, shape, K, False) for r in setup.ranks for dtype in setup.dtypes
             for M in setup.kernel_tokens for name, shape in setup.layer_shapes().items() for K in setup.ks]
    cases += [(setup.ranks[0], dtype, M, name, shape, setup.fp8_k, True) for dtype in setup.dtypes
              for M in setup.kernel_tokens for name, shape in setup.layer_shapes().items()]
    for r, dtype, M, name, (d_in, d_out), K, fp8 in cases:
        if out_of_time(deadline):
            skipped += 1
            continue
        row = {"layer": name, "d_in->d_out": f"{d_in}->{d_out}", "M": M, "K": K, "r": r, "dtype": dtype_name(dtype),
               "weights": "fp8" if fp8 else dtype_name(dtype)}
        gen = torch.Generator(setup.device).manual_seed(M + d_in + d_out + K + r)
        try:
            row.update(check_case(make_set(M, d_in, d_out, K, r, setup.live_rows(M), dtype, setup.device, gen),
                                  gen, K, r, fp8))
        except torch.OutOfMemoryError:
            row.update(ok="out of memory")
        except Exception as e:  # a compile or launch failure is a finding: record it, go on
            row.update(ok=error_text(e))
        rows.append(row)
        free_memory(setup.device)
    if skipped:
        notes.append(f"{skipped} of {len(cases)} cases not run: this part's time budget ran out")
    notes.append("backend='triton' forced; M = joint tokens (all scaled) and text tokens (one span of "
                 f"{SPAN_LEN} scaled); errors = max |ours - fp32| / max |fp32|; adapters in x's dtype, as the "
                 "layers hold them")
    notes.append("weights fp8: the weight quantized per row (quantize_rows: float8_e4m3fn, fp32 scales) and passed "
                 "as weight_scale=; the fp32 reference uses the dequantized weight, so the errors measure the kernel "
                 "(fp8 tiles converted to x's dtype, the scale on the accumulator; for dX the dequantized tile is "
                 "rounded to x's dtype), not the quantization")
    return Part(rows, notes)


def fp32_reference(s: dict, dy: Tensor, K: int, r: int) -> tuple[Tensor, ...]:
    """y, dx, dA, dB in fp32 math from the same (rounded) inputs: x W^T + b + (S (x) (x A^T)) B^T."""
    x, a, b = (s[n].float().requires_grad_() for n in ("x", "lora_a", "lora_b"))
    M = x.shape[0]
    h = ((x @ a.t()).view(M, K, r) * s["scale"][:, :, None]).view(M, K * r)
    y = x @ s["weight"].float().t() + s["bias"].float() + h @ b.t()
    return (y.detach(), *torch.autograd.grad(y, (x, a, b), dy.float()))


def relative_error(got: Tensor, want: Tensor) -> float:
    return ((got.float() - want).abs().max() / want.abs().max()).item()


def check_case(s: dict, gen: torch.Generator, K: int, r: int, fp8: bool) -> dict:
    """Forward and backward (dX, dA, dB) of the Triton path against fp32 math: errors, tolerance, ok."""
    dtype, extra = s["x"].dtype, {}
    if fp8:
        q, scale = quantize_rows(s["weight"])
        s = {**s, "weight": dequantize(q, scale)}  # the reference's fp32 weight: exactly what q and scale stand for
        extra = {"weight_scale": scale}
    dy = torch.randn(s["x"].shape[0], s["weight"].shape[0], generator=gen, device=s["x"].device).to(dtype)
    want = fp32_reference(s, dy, K, r)
    x, a, b = (s[n].detach().clone().requires_grad_() for n in ("x", "lora_a", "lora_b"))
    y = masked_lora_linear(x, q if fp8 else s["weight"], s["bias"], a, b, s["scale"], backend="triton", **extra)
    got = (y, *torch.autograd.grad(y, (x, a, b), dy))
    errors = [relative_error(g, w) for g, w in zip(got, want)]
    return {**{f"err {n}": f"{e:.1e}" for n, e in zip(("y", "dx", "dA", "dB"), errors)},
            "tol": f"{TOLERANCE[dtype]:.1e}", "ok": max(errors) <= TOLERANCE[dtype]}
