"""Benchmark the masked multi-slider LoRA linear at FLUX.1 Kontext shapes.

For each linear shape and adapter count K (rank r each) it times, as medians over rotating input sets
that together exceed the last-level cache:
  base   torch.nn.functional.linear: the frozen layer alone, the yardstick
  ours   kernels.masked_lora_linear with backend=None: "auto" on CUDA (the faster of the Triton and the
         PyTorch path, measured once per shape), the PyTorch path on the CPU
  peft   an unfused PEFT-style layer: per adapter an A GEMM, a B GEMM, a scale, a mask and an add
and prints each as a ratio to base (min / median / max over the interleaved repetitions: repetition i of
every variant runs back to back, so ratio i compares calls made under the same machine state), the
achieved TFLOP/s and the FLOP-ratio bound 1 + (active / M) * K*r*(d_in + d_out) / (d_in*d_out): what ours
would cost if it ran at the base GEMM's rate.

Two token sets: "text" = 512 text tokens of which a contiguous span of 16 has non-zero scales (STLoRA
selects a handful of instruction tokens); "joint" = 8704 joint tokens (1024x1024 Kontext edit), all live.

On CUDA, before timing, the Triton kernel is checked against float64 math (forward and gradients, odd
sizes, fp16/bf16; fp32 only with --fp32-triton: fp32 Triton builds spill and take minutes of ptxas each,
and fp32 inputs take the PyTorch path by default) and ours against an fp32 reference at every benchmarked
shape; any mismatch aborts.
Timing on CUDA follows triton.testing.do_bench: each timed call is preceded by an L2 flush and a short GPU
sleep (so the CPU's launches are queued before the start event), CUDA events around the call, median.

    python benchmarks/bench_lora.py                 # CUDA if present, full table
    python benchmarks/bench_lora.py --device cpu --quick
"""
import argparse
import math
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from slideredit.kernels.masked_lora import masked_lora_linear

FLUX_SHAPES = [(3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (3072, 21504)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SPAN_START, SPAN_LEN = 40, 16  # the text-token span whose scales are non-zero


def machine_name(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def peft_style(x, weight, bias, lora_a, lora_b, alphas, masks):
    """PEFT's unmerged LoRA, one adapter at a time: A GEMM, B GEMM, scale, mask, add (all separate passes)."""
    r = lora_a.shape[0] // len(alphas)
    y = F.linear(x, weight, bias)
    for k, alpha in enumerate(alphas):
        delta = F.linear(F.linear(x, lora_a[k * r:(k + 1) * r]), lora_b[:, k * r:(k + 1) * r])
        delta = delta * alpha
        delta = delta * masks[..., k:k + 1]
        y = y + delta
    return y


def make_set(M, d_in, d_out, K, r, live_rows, dtype, device, gen):
    """One input set: random non-zero operands, scales = alphas on the live rows, 0 elsewhere."""
    randn = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)
    x = randn(M, d_in).to(dtype)
    weight = (randn(d_out, d_in) / d_in**0.5).to(dtype)
    bias = randn(d_out).to(dtype)
    lora_a = (randn(K * r, d_in) / d_in**0.5).to(dtype)
    lora_b = (randn(d_out, K * r) / (K * r) ** 0.5).to(dtype)
    alphas = [0.5 + 0.25 * k for k in range(K)]
    masks = torch.zeros(M, K, device=device, dtype=dtype)
    masks[live_rows] = 1
    scale = masks.float() * torch.tensor(alphas, device=device)
    return dict(x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b, scale=scale, alphas=alphas, masks=masks)


def variants(s, backend: str | None = None):
    return {
        "base": lambda: F.linear(s["x"], s["weight"], s["bias"]),
        "ours": lambda: masked_lora_linear(s["x"], s["weight"], s["bias"], s["lora_a"], s["lora_b"], s["scale"],
                                           backend=backend),
        "peft": lambda: peft_style(s["x"], s["weight"], s["bias"], s["lora_a"], s["lora_b"], s["alphas"], s["masks"]),
    }


def interleaved_times_cuda(fns: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    """{variant: seconds of each timed call}; fns[variant] holds one closure per rotating input set.

    Variants take turns call by call, so a slow phase of the machine hits all of them alike.
    """
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    events = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, calls in fns.items():
            flush.zero_()  # L2 flush, as triton.testing.do_bench
            torch.cuda._sleep(1_000_000)  # ~0.5 ms GPU spin: the call is queued before its start event runs
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            calls[i % len(calls)]()
            end.record()
            if i >= warmup:
                events[name].append((start, end))
    torch.cuda.synchronize()
    return {name: [s.elapsed_time(e) / 1e3 for s, e in pairs] for name, pairs in events.items()}


def interleaved_times_cpu(fns: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    times = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, calls in fns.items():
            t0 = time.perf_counter()
            calls[i % len(calls)]()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def ratio_spread(times: list[float], base: list[float]) -> tuple[float, float, float]:
    """(min, median, max) of times[i] / base[i] over interleaved repetitions i."""
    ratios = sorted(t / b for t, b in zip(times, base, strict=True))
    return ratios[0], statistics.median(ratios), ratios[-1]


def spread_text(spread: tuple[float, float, float]) -> str:
    return "{:.3f} / {:.3f} / {:.3f}".format(*spread)


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def check_kernel_on_gpu(dtypes: tuple[torch.dtype, ...]) -> None:
    """Forward and gradients of the Triton path against float64 math at odd sizes; raises on mismatch."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    M, d_in, d_out, K, r = 1000, 1000, 3000, 3, 16
    for dtype in dtypes:
        s = make_set(M, d_in, d_out, K, r, slice(0, M), dtype, "cuda", gen)
        s["scale"][100:300] = 0  # whole zero row tiles among live ones
        s["scale"][500:520, 1] = 0
        lora_a, lora_b = s["lora_a"].float(), s["lora_b"].float()  # fp32 adapters beside a 16-bit model
        dy = torch.randn(M, d_out, generator=gen, device="cuda", dtype=dtype)

        def outputs_and_grads(backend, cast):
            """y, dx, dA, dB; cast(t) gives each operand's compute copy (adapters rounded to dtype for fp64)."""
            x, a, b = (cast(t).requires_grad_() for t in (s["x"], lora_a, lora_b))
            y = masked_lora_linear(x, cast(s["weight"]), cast(s["bias"]), a, b, s["scale"], backend=backend)
            y.backward(dy.to(y.dtype))
            return y, x.grad, a.grad, b.grad

        got = outputs_and_grads("triton", lambda t: t.detach().clone())
        want = outputs_and_grads("torch", lambda t: t.detach().to(dtype).double())
        tol = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
        for what, g, w in zip(("y", "dx", "dA", "dB"), got, want):
            err = relative_error(g, w)
            assert err < tol, f"GPU check failed: {what} ({dtype}) relative error {err:.2e} >= {tol:.0e}"
    names = "/".join(str(d).removeprefix("torch.") for d in dtypes)
    print(f"GPU check passed: Triton forward and gradients vs float64 ({names}, 1000x1000->3000, K=3, r=16)")


def bench_row(case, M, live_rows, d_in, d_out, K, r, dtype, device, timer, cache_bytes, repeats, warmup,
              backend: str | None = None) -> str:
    gen = torch.Generator(device=device).manual_seed(M + d_in + d_out + K)
    sets = [make_set(M, d_in, d_out, K, r, live_rows, dtype, device, gen)]
    set_bytes = sum(t.numel() * t.element_size() for t in sets[0].values() if isinstance(t, torch.Tensor))
    sets += [make_set(M, d_in, d_out, K, r, live_rows, dtype, device, gen)
             for _ in range(max(2, math.ceil(2 * cache_bytes / set_bytes)) - 1)]
    if device == "cuda":  # the kernel at this exact shape against an fp32 computation
        s = sets[0]
        fp32 = [s[n].float() for n in ("x", "weight", "bias", "lora_a", "lora_b")]
        err = relative_error(variants(s, backend)["ours"](), masked_lora_linear(*fp32, s["scale"], backend="torch"))
        assert err < 2e-2, f"kernel mismatch at M={M} {d_in}->{d_out} K={K}: relative error {err:.2e}"
    per_set = [variants(s, backend) for s in sets]
    times = timer({name: [v[name] for v in per_set] for name in ("base", "ours", "peft")}, repeats, warmup)
    t = {name: statistics.median(ts) for name, ts in times.items()}

    live = live_rows.stop - live_rows.start
    base_flops = 2 * M * d_in * d_out
    lora_flops = 2 * live * K * r * (d_in + d_out)
    return (f"{case:<6} {M:>5} {live:>5} {f'{d_in}->{d_out}':>12} {K:>2} {t['base'] * 1e3:>9.3f} "
            f"{t['ours'] * 1e3:>9.3f} {spread_text(ratio_spread(times['ours'], times['base'])):>23} "
            f"{t['peft'] * 1e3:>9.3f} {spread_text(ratio_spread(times['peft'], times['base'])):>23} "
            f"{1 + lora_flops / base_flops:>7.4f} "
            f"{base_flops / t['base'] / 1e12:>9.2f} {(base_flops + lora_flops) / t['ours'] / 1e12:>9.2f}")


def run(args) -> None:
    device = args.device
    dtype = DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    repeats = args.repeats or (50 if device == "cuda" else 5)
    warmup = 10 if device == "cuda" else 1
    shapes = FLUX_SHAPES[:1] if (args.quick and device == "cpu") else FLUX_SHAPES[::2] if args.quick else FLUX_SHAPES
    joint_tokens = args.joint_tokens or (8704 if device == "cuda" else 1024)
    # fp32 on CUDA: the PyTorch path (cuBLAS) unless the spilling fp32 Triton builds are asked for
    backend = "torch" if device == "cuda" and dtype == torch.float32 and not args.fp32_triton else None
    cases = [("text", args.text_tokens, slice(SPAN_START, SPAN_START + SPAN_LEN)),
             ("joint", joint_tokens, slice(0, joint_tokens))]
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        check_kernel_on_gpu((torch.float16, torch.bfloat16) + ((torch.float32,) if args.fp32_triton else ()))
        cache_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
        timer = interleaved_times_cuda
    else:
        cache_bytes = 64 * 2**20  # a generous last-level cache for server CPUs
        timer = interleaved_times_cpu

    print(f"machine: {machine_name(device)}")
    print(f"dtype {dtype}, r = {args.rank}, {repeats} interleaved repetitions (ms: median; ratios: min / median / "
          f"max); ours = masked_lora_linear, {'backend auto' if device == 'cuda' else 'PyTorch path (CPU)'}")
    header = (f"{'case':<6} {'M':>5} {'live':>5} {'d_in->d_out':>12} {'K':>2} {'base ms':>9} {'ours ms':>9} "
              f"{'ours/base':>23} {'peft ms':>9} {'peft/base':>23} {'bound':>7} {'base TF/s':>9} {'ours TF/s':>9}")
    print(header)
    print("-" * len(header))
    for case, M, live_rows in cases:
        for d_in, d_out in shapes:
            for K in (1, 2, 4):
                print(bench_row(case, M, live_rows, d_in, d_out, K, args.rank, dtype, device, timer, cache_bytes,
                                repeats, warmup, backend), flush=True)
                if device == "cuda":
                    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="default: bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--repeats", type=int, help="timed calls per variant (default: 50 CUDA, 5 CPU)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes (CPU: 3072->3072 only)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--fp32-triton", action="store_true",
                        help="also check the fp32 Triton builds on CUDA (minutes of compilation: they spill)")
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--joint-tokens", type=int, help="default: 8704 on CUDA, 1024 on the CPU (scaled down)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device; use --device cpu")
    run(args)


if __name__ == "__main__":
    main()
