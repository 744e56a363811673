"""Timing per adapted layer shape, as % over the bare GEMM.

bf16: bare F.linear, fused Triton, the PyTorch path, an unfused PEFT-style layer, and backend=None ("auto"):
what it chose, and the overhead over bare next to the FLOP bound. Then fp8 weights at every layer shape,
both M, K = 2 (the last 30 % of the slot is kept for them): fused Triton reading fp8 with the adapters and
without (fp8_linear), and the PyTorch path (dequantize + GEMM), as % over bare bf16 F.linear.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from bench_lora import interleaved_times_cpu, interleaved_times_cuda, make_set, peft_style, ratio_spread
from gpu_report_parts.measure import error_text, free_memory, out_of_time
from gpu_report_parts.setups import Part, Setup, dtype_name
from slideredit.kernels.masked_lora import fp8_linear, masked_lora_linear
from slideredit.quantization import quantize_rows

FP8_TIMING_SHARE = 0.3  # of the slot, kept for the fp8 rows (they run after the bf16 ones)
Variants = Callable[[dict], dict[str, Callable[[], Tensor]]]  # an input set -> {variant: one call on it}


@dataclass(frozen=True)
class Timer:
    """Interleaved repetitions (repetition i of every variant back to back) over rotating input sets."""

    device: str
    cache_bytes: int  # the L2 cache: the input sets together read twice this (0 on the CPU: two sets)
    repeats: int
    warmup: int

    @classmethod
    def on(cls, setup: Setup) -> Timer:
        """On a GPU 20 repetitions after 5 warm-up ones; on the CPU (smoke) the setup's repeats after one."""
        if setup.device == "cuda":
            return cls("cuda", getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20), 20, 5)
        return cls(setup.device, 0, setup.repeats, 1)

    def times(self, make: Callable[[], dict], nbytes: Callable[[dict], int],
              variants: Variants) -> dict[str, list[float]]:
        """{variant: seconds of each timed repetition}, the variants in the order `variants` lists them."""
        calls: dict[str, list[Callable[[], Tensor]]] = {}
        for s in cache_busting_sets(make, nbytes, self.cache_bytes):
            for name, call in variants(s).items():
                calls.setdefault(name, []).append(call)
        interleaved_times = interleaved_times_cuda if self.device == "cuda" else interleaved_times_cpu
        with torch.inference_mode():
            return interleaved_times(calls, self.repeats, self.warmup)


def measure(setup: Setup, deadline: float) -> Part:
    timer, dtype, r = Timer.on(setup), setup.dtype, setup.ranks[0]
    shapes = setup.layer_shapes().items()
    cases = [(M, name, shape, K) for M in setup.kernel_tokens for name, shape in shapes for K in setup.ks]
    fp8_cases = [(M, name, shape, setup.fp8_k) for M in setup.kernel_tokens for name, shape in shapes]
    bf16_deadline = deadline - FP8_TIMING_SHARE * max(0.0, deadline - time.perf_counter())
    rows, skipped = time_cases(setup, timer, cases, bf16_deadline, fp8=False)
    fp8_rows, fp8_skipped = time_cases(setup, timer, fp8_cases, deadline, fp8=True)
    notes = []
    if skipped or fp8_skipped:
        notes.append(f"{skipped} of {len(cases)} {dtype_name(dtype)} and {fp8_skipped} of {len(fp8_cases)} fp8 "
                     f"shapes not timed: this part's time budget ran out (the fp8 rows keep the last "
                     f"{FP8_TIMING_SHARE:.0%} of it)")
    notes.append(f"{dtype_name(dtype)}, r = {r}; {timer.repeats} interleaved repetitions over rotating input sets "
                 f"larger than twice the L2 cache; % over bare per repetition (same round), min / median / max; "
                 "FLOP bound = the low-rank FLOPs over the base GEMM's (KERNEL.md); auto = backend=None")
    notes.append(f"weights fp8: float8_e4m3fn + fp32 row scales (quantize_rows), K = {setup.fp8_k} (GSTLoRA + "
                 f"STLoRA), x {dtype_name(dtype)}; bare = bf16 F.linear on the unquantized weight; triton = "
                 "masked_lora_linear(weight_scale=) forced to Triton, triton no adapter = fp8_linear, torch = the "
                 "PyTorch path (dequantizes the weight every call, then bf16 GEMMs)")
    return Part(rows + fp8_rows, notes)


def time_cases(setup: Setup, timer: Timer, cases: list[tuple], deadline: float, fp8: bool) -> tuple[list[dict], int]:
    """One row per (M, layer, (d_in, d_out), K) case until the deadline -> (rows, cases skipped). A case that
    fails records why in its "auto chose" cell (a compile or launch failure is a finding)."""
    dev, dtype, r = setup.device, setup.dtype, setup.ranks[0]
    rows, skipped = [], 0
    for M, name, (d_in, d_out), K in cases:
        if out_of_time(deadline):
            skipped += 1
            continue
        live = setup.live_rows(M)
        gen = torch.Generator(dev).manual_seed(M + d_in + d_out + K)
        make = lambda: make_set(M, d_in, d_out, K, r, live, dtype, dev, gen)
        row = {"weights": "fp8" if fp8 else dtype_name(dtype), "layer": name, "d_in->d_out": f"{d_in}->{d_out}",
               "M": M, "live": live.stop - live.start, "K": K}
        try:
            if fp8:
                row.update(fp8_timings(timer, lambda: fp8_set(make())))
            else:
                row.update(bf16_timings(timer, make, M, live, d_in, d_out, K * r))
        except torch.OutOfMemoryError:
            row["auto chose"] = "out of memory"
        except Exception as e:
            row["auto chose"] = error_text(e)
        rows.append(row)
        free_memory(dev)
    return rows, skipped


def bf16_timings(timer: Timer, make: Callable[[], dict], M: int, live: slice, d_in: int, d_out: int,
                 stacked_rank: int) -> dict:
    """Bare F.linear, fused Triton, the PyTorch path, PEFT-style and backend=None; the FLOP bound; what
    backend=None chose."""
    times = timer.times(make, lambda s: sum(t.numel() * t.element_size() for t in s.values() if isinstance(t, Tensor)),
                        bf16_variants)
    lora_flops = 2 * (live.stop - live.start) * stacked_rank * (d_in + d_out)
    return {**over_bare(times), "FLOP bound %": f"+{100 * lora_flops / (2 * M * d_in * d_out):.2f}",
            "auto chose": auto_choice(M, d_in, d_out, stacked_rank)}


def bf16_variants(s: dict) -> dict[str, Callable[[], Tensor]]:
    args = (s["x"], s["weight"], s["bias"], s["lora_a"], s["lora_b"], s["scale"])
    return {"bare": lambda: F.linear(s["x"], s["weight"], s["bias"]),
            "triton": lambda: masked_lora_linear(*args, backend="triton"),
            "torch": lambda: masked_lora_linear(*args, backend="torch"),
            "peft": lambda: peft_style(s["x"], s["weight"], s["bias"], s["lora_a"], s["lora_b"], s["alphas"],
                                       s["masks"]),
            "auto": lambda: masked_lora_linear(*args, backend=None)}


def fp8_timings(timer: Timer, make: Callable[[], dict]) -> dict:
    """fp8 weights: bare bf16 F.linear (the cost to beat), the fused Triton GEMM reading fp8 with the adapters
    and without (fp8_linear), and the PyTorch path (dequantize per call, then the bf16 GEMMs)."""
    times = timer.times(make, lambda s: sum(s[n].numel() * s[n].element_size()  # what the fp8 variants read
                                            for n in ("x", "fp8", "weight_scale", "bias", "lora_a", "lora_b", "scale")),
                        fp8_variants)
    return {**over_bare(times), "auto chose": "not run (fp8 rows: backends forced)"}


def fp8_variants(s: dict) -> dict[str, Callable[[], Tensor]]:
    args = (s["x"], s["fp8"], s["bias"], s["lora_a"], s["lora_b"], s["scale"])
    return {"bare": lambda: F.linear(s["x"], s["weight"], s["bias"]),
            "triton": lambda: masked_lora_linear(*args, backend="triton", weight_scale=s["weight_scale"]),
            "triton no adapter": lambda: fp8_linear(s["x"], s["fp8"], s["weight_scale"], s["bias"], backend="triton"),
            "torch": lambda: masked_lora_linear(*args, backend="torch", weight_scale=s["weight_scale"])}


def over_bare(times: dict[str, list[float]]) -> dict[str, str]:
    """The bare median in ms, then every other variant as % over bare per repetition (the same round),
    min / median / max."""
    return {"bare ms": f"{statistics.median(times['bare']) * 1e3:.3f}",
            **{f"{name} % over bare (min/med/max)": percent_over(seconds, times["bare"])
               for name, seconds in times.items() if name != "bare"}}


def auto_choice(M: int, d_in: int, d_out: int, stacked_rank: int) -> str:
    """What backend=None chose for this forward shape, from slideredit.kernels.dispatch's record when it exists."""
    try:
        from slideredit.kernels import dispatch
    except ImportError:
        return "n/a (no slideredit.kernels.dispatch)"
    found = [d for d in dispatch.decisions() if d.get("op") == "forward" and d.get("n") == d_out
             and d.get("d") == d_in and d.get("stacked_rank") == stacked_rank
             and d.get("m_bucket") == dispatch.m_bucket(M)]
    return f"{found[-1]['backend']} ({found[-1].get('reason', '')})" if found else "n/a (not recorded)"


def cache_busting_sets(make: Callable[[], dict], nbytes: Callable[[dict], int], cache_bytes: int) -> list[dict]:
    """At least two input sets, and enough that cycling through them reads twice the L2 cache: every
    timed call starts from cold operands, as inside a real forward."""
    first = make()
    return [first] + [make() for _ in range(max(2, math.ceil(2 * cache_bytes / nbytes(first))) - 1)]


def fp8_set(s: dict) -> dict:
    """A make_set input set plus its weight quantized per row; the bf16 weight stays for bare F.linear."""
    q, scale = quantize_rows(s["weight"])
    return {**s, "fp8": q, "weight_scale": scale}


def percent_over(times: list[float], bare: list[float]) -> str:
    return " / ".join(f"{100 * (ratio - 1):+.1f}" for ratio in ratio_spread(times, bare))
