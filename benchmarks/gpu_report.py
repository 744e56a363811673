"""Everything this project needs measured on a GPU, in one command that fits a short GPU loan.

    python benchmarks/gpu_report.py --out reports/h100          # one H100/H200: <= 8 minutes
    python benchmarks/gpu_report.py --out /tmp/smoke --smoke    # the same code at tiny shapes, CPU

Random weights at the real FLUX.1 Kontext [dev] shapes (built on the meta device, materialised with
torch.empty on the GPU and filled with small random values: nothing is downloaded and nothing is ever
allocated on the CPU), bf16. The parts, run in this order:
  e  a complete 28-step 1024^2 edit through SliderEditFluxKontextPipeline with a GSTLoRA slider
     (prompt_embeds: no text encoder; the autoencoder at full size). It runs first so that its first
     call pays what a fresh process pays: kernel compilation, autotuning, the dispatch measurement
  a  kernel correctness at every adapted layer shape (M = 8704 and 512, K = 1, 2, 4, r = 16, 32, bf16
     and fp16, forward and backward) against fp32 math
  b  timing per layer shape: bare F.linear, fused Triton, the PyTorch path, an unfused PEFT-style layer,
     and backend=None ("auto"): what it chose, overhead over bare against the FLOP bound
  c  a full transformer forward (2 x 4096 image + 512 text tokens): base, GSTLoRA, STLoRA, both, and both
     with torch.compile'd blocks (alphas moving every call, no recompilation allowed); then diffusers'
     FluxTransformer2DModel + peft beside it when importable
  d  one GSTLoRA and one STLoRA training step (self-distillation loss, AdamW) at 512^2 and 1024^2,
     gradient checkpointing on and off
  f  report.json and report.md in --out (GPU, driver, torch, triton), the markdown also printed.
Each part has a time budget (printed first; 400 s in all, plus at most 34 s for the peer and the
model build: about 7.6 minutes, with headroom for a case that compiles past its slot). A part
stops at the end of its slot in that schedule (so one that overran shortens the next ones), and a case
that runs out of memory is recorded as such, both with a note in the report; a part that fails becomes
a note too, and the report is rewritten after every part. Timings are min / median / max of a few
repetitions. --smoke runs every part at tiny shapes on the CPU (Triton in its interpreter): its numbers
mean nothing, it proves the script runs (the test suite runs it).
"""
from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # before kernels is imported: Triton decides interpreted or compiled at import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse
import contextlib
import gc
import json
import math
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora import SPAN_LEN, SPAN_START, interleaved_times_cpu, interleaved_times_cuda, make_set, peft_style  # noqa: E402

from kernels import masked_lora_linear  # noqa: E402
from slideredit.atomic import atomic_path  # noqa: E402
from slideredit.compile import compile_blocks, uncompile_blocks  # noqa: E402
from slideredit.autoencoder import AutoEncoder, AutoEncoderParams  # noqa: E402
from slideredit.sampling import latent_ids, text_ids  # noqa: E402
from slideredit.sliders import GSTLORA, STLORA, TARGETS, add_adapter, is_fused_qkv, part_rows, \
    remove_adapters, set_slider_scale  # noqa: E402
from slideredit.transformer import Flux, FluxParams  # noqa: E402

# Agreement with fp32 math, relative to the output's scale: 4 units of the dtype's precision (both sides
# accumulate in fp32 from the same rounded inputs; ours rounds the output and H~ once).
TOLERANCE = {torch.bfloat16: 4 * 2.0**-7, torch.float16: 4 * 2.0**-10}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
GST_ALPHA, ST_ALPHA = 0.7, 0.8


@dataclass(frozen=True)
class Setup:
    """The shapes, repetitions and time budget of one report."""

    name: str
    device: str
    flux: FluxParams
    autoencoder: AutoEncoderParams
    text_tokens: int  # T5 tokens
    edit_px: int  # the edit's side in pixels
    train_px: tuple[int, ...]
    edit_steps: int
    kernel_tokens: tuple[int, ...]  # M of part a and b
    ks: tuple[int, ...]
    ranks: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    repeats: int
    rank: int = 16  # of the model-level adapters (c, d, e)
    kernel_layers: tuple[str, ...] | None = None  # the layer shapes of parts a and b; None: all of them
    compile_backend: str = "inductor"  # part c's compiled rows (smoke: aot_eager, the same guards, no C++ build)

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16

    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        """Every adapted linear of the transformer: name -> (d_in, d_out)."""
        h, m = self.flux.hidden_size, self.flux.mlp_hidden_dim
        shapes = {"attn.qkv": (h, 3 * h), "attn.proj": (h, h), "mlp.0": (h, m), "mlp.2": (m, h),
                  "single linear1": (h, 3 * h + m)}
        return {k: v for k, v in shapes.items() if self.kernel_layers is None or k in self.kernel_layers}


def real_setup(device: str) -> Setup:
    return Setup("FLUX.1 Kontext [dev] shapes", device, FluxParams.kontext_dev(), AutoEncoderParams.flux(),
                 text_tokens=512, edit_px=1024, train_px=(512, 1024), edit_steps=28, kernel_tokens=(8704, 512),
                 ks=(1, 2, 4), ranks=(16, 32), dtypes=(torch.bfloat16, torch.float16), repeats=3)


def smoke_setup() -> Setup:
    return Setup("smoke (tiny shapes, CPU; numbers mean nothing)", "cpu", FluxParams.tiny(), AutoEncoderParams.tiny(),
                 text_tokens=8, edit_px=32, train_px=(32,), edit_steps=2, kernel_tokens=(24, 8), ks=(1, 2),
                 ranks=(4,), dtypes=(torch.bfloat16, torch.float16), repeats=1, rank=4,
                 kernel_layers=("attn.proj",), compile_backend="aot_eager")  # interpreted Triton: ~0.3 ms per program instance


# Share of the time budget per part (e includes building the model); what a part leaves is not reused.
BUDGET_SHARES = {"e": 0.22, "a": 0.22, "b": 0.14, "c": 0.17, "d": 0.25}
TITLES = {"e": "28-step edit through the pipeline", "a": "kernel correctness against fp32 math",
          "b": "kernel timing per layer shape", "c": "full transformer forward", "d": "training step"}


@dataclass
class Part:
    """What one part returns: table rows (dicts with the same keys) and notes (skips, errors, labels)."""

    rows: list[dict]
    notes: list[str]


# ---------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------

def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def wall(fn: Callable[[], object], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def spread_ms(seconds: list[float]) -> str:
    ms = sorted(s * 1e3 for s in seconds)
    return f"{ms[0]:.1f} / {statistics.median(ms):.1f} / {ms[-1]:.1f}"


def out_of_time(deadline: float) -> bool:
    return time.perf_counter() > deadline


# ---------------------------------------------------------------------------------------------------
# Random models at real shapes
# ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def fill_random_(module: nn.Module, seed: int) -> nn.Module:
    """Small random weights (std 0.5 / sqrt(fan_in), so activations stay moderate through 57 blocks),
    norm gains 1, small biases."""
    device = next(module.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            p.normal_(0, 0.5 / math.sqrt(p[0].numel()), generator=g)
        elif name.endswith("bias"):
            p.normal_(0, 0.02, generator=g)
        else:
            p.fill_(1)
    return module


def materialise(make: Callable[[], nn.Module], device: str, dtype: torch.dtype, seed: int) -> nn.Module:
    """Build on the meta device, then torch.empty on `device` in `dtype`, then fill: one copy, never on the CPU
    first (unless the device is the CPU)."""
    with torch.device("meta"):
        module = make().to(dtype)
    if any(True for _ in module.buffers()):
        raise RuntimeError(f"{type(module).__name__} has buffers: to_empty would leave them uninitialised")
    return fill_random_(module.to_empty(device=device), seed).eval().requires_grad_(False)


def random_adapter(model: Flux, name: str, rank: int, device: str, trainable: bool = False, seed: int = 1) -> None:
    """A random adapter on `name`'s targets, made on the device, fp32 (as load_adapter and training keep them)."""
    g = torch.Generator(device).manual_seed(seed)
    hidden = model.params.hidden_size
    weights = {}
    for module in TARGETS[name](model):
        layer = model.get_submodule(module)
        weights[module] = {}
        for part in ("q", "k", "v") if is_fused_qkv(module) else ("all",):
            start, end = part_rows(part, hidden, layer.out_features)
            weights[module][part] = (torch.randn(rank, layer.in_features, generator=g, device=device) / layer.in_features**0.5,
                                     0.02 * torch.randn(end - start, rank, generator=g, device=device))
    add_adapter(model, name, weights, trainable=trainable)


def text_span_scale(setup: Setup, alpha: float) -> Tensor:
    """STLoRA: alpha on one sub-prompt's span of text tokens, 0 elsewhere. (1, T)"""
    scale = torch.zeros(1, setup.text_tokens, device=setup.device)
    start = min(5, setup.text_tokens - 2)
    scale[:, start:start + max(1, min(7, setup.text_tokens // 4))] = alpha
    return scale


def transformer_inputs(setup: Setup, px: int, seed: int = 0) -> dict[str, Tensor]:
    """One sample: noisy + context image tokens of a px x px edit, T5 and CLIP embeddings, ids, timestep."""
    p, dev, dt = setup.flux, setup.device, setup.dtype
    side = px // 16
    g = torch.Generator(dev).manual_seed(seed)
    ids = torch.cat([latent_ids(1, side, side, first_id=0, device=dev, dtype=dt),
                     latent_ids(1, side, side, first_id=1, device=dev, dtype=dt)], dim=1)
    return dict(img=torch.randn(1, 2 * side * side, p.in_channels, generator=g, device=dev).to(dt), img_ids=ids,
                txt=torch.randn(1, setup.text_tokens, p.context_in_dim, generator=g, device=dev).to(dt),
                txt_ids=text_ids(1, setup.text_tokens, dev, dt), timesteps=torch.full((1,), 0.7, device=dev, dtype=dt),
                y=torch.randn(1, p.vec_in_dim, generator=g, device=dev).to(dt),
                guidance=torch.full((1,), 2.5, device=dev, dtype=dt))


# ---------------------------------------------------------------------------------------------------
# Part e: a complete edit through the pipeline, first call separately
# ---------------------------------------------------------------------------------------------------

def part_edit(setup: Setup, model: Flux, deadline: float) -> Part:
    from PIL import Image

    from slideredit.pipelines import SliderEditFluxKontextPipeline

    dev, notes = setup.device, []
    autoencoder = materialise(lambda: AutoEncoder(setup.autoencoder), dev, setup.dtype, seed=3)
    pipe = SliderEditFluxKontextPipeline(model, autoencoder, text_encoders=None)
    pipe.set_progress_bar_config(disable=True)
    random_adapter(model, GSTLORA, setup.rank, dev)
    g = torch.Generator(dev).manual_seed(0)
    embeds = torch.randn(1, setup.text_tokens, setup.flux.context_in_dim, generator=g, device=dev).to(setup.dtype)
    pooled = torch.randn(1, setup.flux.vec_in_dim, generator=g, device=dev).to(setup.dtype)
    pixels = torch.randint(0, 256, (setup.edit_px, setup.edit_px, 3), generator=torch.Generator().manual_seed(0))
    image = Image.fromarray(pixels.to(torch.uint8).numpy())

    step_times: list[float] = []  # seconds of each transformer call (one per sampling step)
    started = [0.0]

    def before_step(module, args) -> None:  # hooks return None: anything else would replace args / output
        sync(dev)
        started[0] = time.perf_counter()

    def after_step(module, args, output) -> None:
        sync(dev)
        step_times.append(time.perf_counter() - started[0])

    pre, post = model.register_forward_pre_hook(before_step), model.register_forward_hook(after_step)

    def edit():
        return pipe(image=image, prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_inference_steps=setup.edit_steps,
                    guidance_scale=2.5, height=setup.edit_px, width=setup.edit_px, auto_resize=setup.edit_px >= 512,
                    generator=torch.Generator().manual_seed(0), output_type="pt", slider_alpha=0.5).images

    rows = []
    try:
        for call in ("first call", "second call"):
            if call == "second call" and out_of_time(deadline - wall_estimate(rows)):
                notes.append("second edit skipped: it would overrun this part's time budget")
                break
            step_times.clear()
            reset_peak(dev)
            start = time.perf_counter()
            images = edit()
            sync(dev)
            seconds = time.perf_counter() - start
            steps = sorted(step_times)
            rows.append({"call": call, "wall s": f"{seconds:.2f}", "steps": len(step_times),
                         "step ms (min / median / max)": spread_ms(step_times),
                         "first step - median step ms": f"{(step_times[0] - statistics.median(steps)) * 1e3:.1f}",
                         "rest of the edit s (VAE, sampling)": f"{seconds - sum(step_times):.2f}",
                         "peak GiB": fmt_gib(peak_gib(dev)), "output finite": bool(torch.isfinite(images).all())})
    except torch.OutOfMemoryError:
        notes.append("out of memory during the edit")
    finally:
        pre.remove()
        post.remove()
        remove_adapters(model)
        del pipe, autoencoder
        free_memory(dev)
    if len(rows) == 2:
        overhead = float(rows[0]["wall s"]) - float(rows[1]["wall s"])
        notes.append(f"first-call overhead (compilation, autotuning, dispatch measurement, allocator warm-up): "
                     f"{overhead:.2f} s = first call - second call")
    notes.append(f"{setup.edit_px}x{setup.edit_px} edit, {setup.edit_steps} steps, GSTLoRA rank {setup.rank} at "
                 f"slider_alpha 0.5, random weights, prompt_embeds (no text encoder), {dtype_name(setup.dtype)}")
    return Part(rows, notes)


def wall_estimate(rows: list[dict]) -> float:
    return float(rows[-1]["wall s"]) if rows else 0.0


def fmt_gib(value: float | None) -> str:
    return "n/a (CPU)" if value is None else f"{value:.2f}"


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype))


# ---------------------------------------------------------------------------------------------------
# Part a: kernel correctness at every adapted layer shape
# ---------------------------------------------------------------------------------------------------

def live_rows(M: int, text: bool) -> slice:
    """Text stream: one STLoRA span selected; joint tokens: all live."""
    return slice(min(SPAN_START, M // 4), min(SPAN_START, M // 4) + min(SPAN_LEN, M // 2)) if text else slice(0, M)


def fp32_reference(s: dict, dy: Tensor, K: int, r: int) -> tuple[Tensor, ...]:
    """y, dx, dA, dB in fp32 math from the same (rounded) inputs: x W^T + b + (S (x) (x A^T)) B^T."""
    x, a, b = (s[n].float().requires_grad_() for n in ("x", "lora_a", "lora_b"))
    M = x.shape[0]
    h = ((x @ a.t()).view(M, K, r) * s["scale"][:, :, None]).view(M, K * r)
    y = x @ s["weight"].float().t() + s["bias"].float() + h @ b.t()
    return (y.detach(), *torch.autograd.grad(y, (x, a, b), dy.float()))


def relative_error(got: Tensor, want: Tensor) -> float:
    return ((got.float() - want).abs().max() / want.abs().max()).item()


def part_correctness(setup: Setup, deadline: float) -> Part:
    rows, notes, skipped = [], [], 0
    text_m = min(setup.kernel_tokens)
    cases = [(r, dtype, M, name, shape, K) for r in setup.ranks for dtype in setup.dtypes for M in setup.kernel_tokens
             for name, shape in setup.layer_shapes().items() for K in setup.ks]
    for r, dtype, M, name, (d_in, d_out), K in cases:
        if out_of_time(deadline):
            skipped += 1
            continue
        row = {"layer": name, "d_in->d_out": f"{d_in}->{d_out}", "M": M, "K": K, "r": r, "dtype": dtype_name(dtype)}
        gen = torch.Generator(setup.device).manual_seed(M + d_in + d_out + K + r)
        try:
            s = make_set(M, d_in, d_out, K, r, live_rows(M, M == text_m), dtype, setup.device, gen)
            dy = torch.randn(M, d_out, generator=gen, device=setup.device).to(dtype)
            want = fp32_reference(s, dy, K, r)
            x, a, b = (s[n].detach().clone().requires_grad_() for n in ("x", "lora_a", "lora_b"))
            y = masked_lora_linear(x, s["weight"], s["bias"], a, b, s["scale"], backend="triton")
            got = (y, *torch.autograd.grad(y, (x, a, b), dy))
            errors = [relative_error(g, w) for g, w in zip(got, want)]
            row.update({f"err {n}": f"{e:.1e}" for n, e in zip(("y", "dx", "dA", "dB"), errors)})
            row.update(tol=f"{TOLERANCE[dtype]:.1e}", ok=max(errors) <= TOLERANCE[dtype])
        except torch.OutOfMemoryError:
            row.update(ok="out of memory")
        except Exception as e:  # a compile or launch failure is a finding: record it, go on
            row.update(ok=f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
        rows.append(row)
        s = dy = want = got = x = a = b = y = None
        free_memory(setup.device)
    if skipped:
        notes.append(f"{skipped} of {len(cases)} cases not run: this part's time budget ran out")
    notes.append("backend='triton' forced; M = joint tokens (all scaled) and text tokens (one span of "
                 f"{SPAN_LEN} scaled); errors = max |ours - fp32| / max |fp32|; adapters in x's dtype, as the "
                 "layers hold them")
    return Part(rows, notes)


# ---------------------------------------------------------------------------------------------------
# Part b: timing per layer shape
# ---------------------------------------------------------------------------------------------------

def auto_choice(M: int, d_in: int, d_out: int, stacked_rank: int) -> str:
    """What backend=None chose for this forward shape, from kernels.dispatch's record when it exists."""
    try:
        from kernels import dispatch
    except ImportError:
        return "n/a (no kernels.dispatch)"
    found = [d for d in dispatch.decisions() if d.get("op") == "forward" and d.get("n") == d_out
             and d.get("d") == d_in and d.get("stacked_rank") == stacked_rank
             and d.get("m_bucket") == dispatch.m_bucket(M)]
    return f"{found[-1]['backend']} ({found[-1].get('reason', '')})" if found else "n/a (not recorded)"


def part_timing(setup: Setup, deadline: float) -> Part:
    dev, dtype, r = setup.device, setup.dtype, setup.ranks[0]
    timer = interleaved_times_cuda if dev == "cuda" else interleaved_times_cpu
    cache_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20) if dev == "cuda" else 0
    repeats, warmup = (20, 5) if dev == "cuda" else (setup.repeats, 1)
    rows, notes, skipped = [], [], 0
    text_m = min(setup.kernel_tokens)
    cases = [(M, name, shape, K) for M in setup.kernel_tokens for name, shape in setup.layer_shapes().items()
             for K in setup.ks]
    for M, name, (d_in, d_out), K in cases:
        if out_of_time(deadline):
            skipped += 1
            continue
        live = live_rows(M, M == text_m)
        gen = torch.Generator(dev).manual_seed(M + d_in + d_out + K)
        row = {"layer": name, "d_in->d_out": f"{d_in}->{d_out}", "M": M, "live": live.stop - live.start, "K": K}
        try:
            sets = [make_set(M, d_in, d_out, K, r, live, dtype, dev, gen)]
            set_bytes = sum(t.numel() * t.element_size() for t in sets[0].values() if isinstance(t, Tensor))
            sets += [make_set(M, d_in, d_out, K, r, live, dtype, dev, gen)
                     for _ in range(max(2, math.ceil(2 * cache_bytes / set_bytes)) - 1)]
            fns = {"bare": [], "triton": [], "torch": [], "peft": [], "auto": []}
            for s in sets:
                args = (s["x"], s["weight"], s["bias"], s["lora_a"], s["lora_b"], s["scale"])
                fns["bare"].append(lambda s=s: F.linear(s["x"], s["weight"], s["bias"]))
                for backend, key in (("triton", "triton"), ("torch", "torch"), (None, "auto")):
                    fns[key].append(lambda args=args, backend=backend: masked_lora_linear(*args, backend=backend))
                fns["peft"].append(lambda s=s: peft_style(s["x"], s["weight"], s["bias"], s["lora_a"], s["lora_b"],
                                                          s["alphas"], s["masks"]))
            with torch.inference_mode():
                times = timer(fns, repeats, warmup)
            base = statistics.median(times["bare"])
            lora_flops = 2 * (live.stop - live.start) * K * r * (d_in + d_out)
            row["bare ms"] = f"{base * 1e3:.3f}"
            for key in ("triton", "torch", "peft", "auto"):
                ratios = sorted(t / b - 1 for t, b in zip(times[key], times["bare"]))
                row[f"{key} % over bare (min/med/max)"] = \
                    f"{100 * ratios[0]:+.1f} / {100 * statistics.median(ratios):+.1f} / {100 * ratios[-1]:+.1f}"
            row["FLOP bound %"] = f"+{100 * lora_flops / (2 * M * d_in * d_out):.2f}"
            row["auto chose"] = auto_choice(M, d_in, d_out, K * r)
        except torch.OutOfMemoryError:
            row["auto chose"] = "out of memory"
        except Exception as e:
            row["auto chose"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        rows.append(row)
        sets = fns = None
        free_memory(dev)
    if skipped:
        notes.append(f"{skipped} of {len(cases)} shapes not timed: this part's time budget ran out")
    notes.append(f"{dtype_name(dtype)}, r = {r}; {repeats} interleaved repetitions over rotating input sets "
                 f"larger than twice the L2 cache; % over bare per repetition (same round), min / median / max; "
                 "FLOP bound = the low-rank FLOPs over the base GEMM's (KERNEL.md); auto = backend=None")
    return Part(rows, notes)


# ---------------------------------------------------------------------------------------------------
# Part c: full transformer forward, ours and diffusers + peft
# ---------------------------------------------------------------------------------------------------

def time_calls(fn: Callable[[], object], device: str, repeats: int) -> tuple[list[float], float | None]:
    """One warm-up call, then `repeats` timed calls; -> (seconds per call, peak GiB of the timed calls)."""
    fn()
    reset_peak(device)
    seconds = [wall(fn, device) for _ in range(repeats)]
    return seconds, peak_gib(device)


def part_forward(setup: Setup, model: Flux, deadline: float) -> Part:
    dev, rows, notes = setup.device, [], []
    inputs = transformer_inputs(setup, setup.edit_px)
    random_adapter(model, GSTLORA, setup.rank, dev, seed=1)
    random_adapter(model, STLORA, setup.rank, dev, seed=2)
    variants = {"base": (None, None), "GSTLoRA": (GST_ALPHA, None), "STLoRA": (None, text_span_scale(setup, ST_ALPHA)),
                "GSTLoRA + STLoRA": (GST_ALPHA, text_span_scale(setup, ST_ALPHA))}
    try:
        with torch.inference_mode():
            for name, (gst, st) in variants.items():
                if out_of_time(deadline):
                    notes.append(f"ours {name}: skipped, time budget")
                    continue
                set_slider_scale(model, GSTLORA, gst)
                set_slider_scale(model, STLORA, st)
                try:
                    seconds, peak = time_calls(lambda: model(**inputs), dev, setup.repeats)
                    rows.append({"model": "ours", "variant": name, "ms per forward (min / median / max)": spread_ms(seconds),
                                 "peak GiB": fmt_gib(peak)})
                except torch.OutOfMemoryError:
                    notes.append(f"ours {name}: out of memory")
            if out_of_time(deadline):
                notes.append("ours compiled: skipped, time budget")
            else:
                compiled_forward(setup, model, inputs, rows, notes)
    finally:
        uncompile_blocks(model)
        remove_adapters(model)
        free_memory(dev)
    tokens = inputs["img"].shape[1] + setup.text_tokens
    notes.append(f"{tokens} tokens ({inputs['img'].shape[1]} image + {setup.text_tokens} text), batch 1, "
                 f"{dtype_name(setup.dtype)}, rank {setup.rank}; GSTLoRA alpha {GST_ALPHA} everywhere, STLoRA "
                 f"{ST_ALPHA} on one span of text tokens; one warm-up call, then {setup.repeats} timed")
    return Part(rows, notes)


def compiled_forward(setup: Setup, model: Flux, inputs: dict[str, Tensor], rows: list[dict], notes: list[str]) -> None:
    """GSTLoRA + STLoRA through compile_blocks: warm-up (compilation) timed apart, then timed calls that
    each move both sliders, under fail_on_recompile (a recompilation would fail the part)."""
    dev = setup.device
    compile_blocks(model, backend=setup.compile_backend)
    alphas = iter([GST_ALPHA, -GST_ALPHA, 0.0, 0.5 * GST_ALPHA] * (setup.repeats + 1))

    def forward():
        alpha = next(alphas)
        set_slider_scale(model, GSTLORA, alpha)
        set_slider_scale(model, STLORA, text_span_scale(setup, -alpha))
        return model(**inputs)

    try:
        start = time.perf_counter()
        wall(forward, dev)
        warm = time.perf_counter() - start
        with torch.compiler.set_stance("fail_on_recompile"):
            seconds, peak = time_calls(forward, dev, setup.repeats)
        rows.append({"model": "ours compiled", "variant": "GSTLoRA + STLoRA, alphas moved every call",
                     "ms per forward (min / median / max)": spread_ms(seconds), "peak GiB": fmt_gib(peak)})
        notes.append(f"ours compiled: torch.compile backend {setup.compile_backend} on every block "
                     f"(slideredit/compile.py); first call (compilation) {warm:.1f} s; no recompilation while "
                     "the alphas moved (fail_on_recompile)")
    except torch.OutOfMemoryError:
        notes.append("ours compiled: out of memory")


def part_forward_peer(setup: Setup, deadline: float) -> Part:
    """diffusers' FluxTransformer2DModel + peft at the same shapes (its own random weights: timing only)."""
    try:
        import peft  # noqa: F401
        from diffusers import FluxTransformer2DModel
        from diffusers.utils import logging
    except ImportError as e:
        return Part([], [f"diffusers + peft: skipped, not importable ({e})"])
    from bench_step import release_adapter

    logging.set_verbosity_error()
    dev, p, rows, notes = setup.device, setup.flux, [], []
    if out_of_time(deadline):
        return Part([], ["diffusers + peft: skipped, time budget"])
    peer = materialise(lambda: FluxTransformer2DModel(
        in_channels=p.in_channels, num_layers=p.depth, num_single_layers=p.depth_single_blocks,
        attention_head_dim=p.head_dim, num_attention_heads=p.num_heads, joint_attention_dim=p.context_in_dim,
        pooled_projection_dim=p.vec_in_dim, guidance_embeds=True, axes_dims_rope=tuple(p.axes_dim)),
        dev, setup.dtype, seed=4)
    inputs = transformer_inputs(setup, setup.edit_px)
    ids = inputs["img_ids"][0]
    scale = text_span_scale(setup, ST_ALPHA)[..., None].to(setup.dtype)

    def forward():
        return peer(hidden_states=inputs["img"], encoder_hidden_states=inputs["txt"], pooled_projections=inputs["y"],
                    timestep=inputs["timesteps"], img_ids=ids, txt_ids=inputs["txt_ids"][0],
                    guidance=inputs["guidance"], return_dict=False)[0]

    try:
        with torch.inference_mode():
            for name in ("base", GSTLORA, STLORA):
                if out_of_time(deadline):
                    notes.append(f"diffusers + peft {name}: skipped, time budget")
                    continue
                hooks = []
                if name != "base":  # adapters in the dtype a user loads them in beside a bf16 model: bf16
                    adapter = release_adapter(name, p.depth, p.depth_single_blocks, p.hidden_size, dev, setup.dtype)
                    peer.load_lora_adapter({k.removeprefix("transformer."): v for k, v in adapter.items()},
                                           adapter_name=name, prefix=None)
                    peer.set_adapters([name], [GST_ALPHA if name == GSTLORA else 1.0])
                    if name == STLORA:  # peft has no per-token selection: scale the LoRA branch's output
                        hooks = [m.register_forward_hook(lambda m, a, out: out * scale)
                                 for n, m in peer.named_modules() if n.endswith(f"lora_B.{name}")]
                try:
                    seconds, peak = time_calls(forward, dev, setup.repeats)
                    rows.append({"model": "diffusers + peft", "variant": {"base": "base", GSTLORA: "GSTLoRA",
                                                                         STLORA: "STLoRA (hooked)"}[name],
                                 "ms per forward (min / median / max)": spread_ms(seconds), "peak GiB": fmt_gib(peak)})
                except torch.OutOfMemoryError:
                    notes.append(f"diffusers + peft {name}: out of memory")
                for h in hooks:
                    h.remove()
                if name != "base":
                    peer.delete_adapters(name)
    finally:
        del peer
        free_memory(dev)
    notes.append("diffusers + peft: its own random weights (timing only); STLoRA through forward hooks that "
                 "multiply each LoRA branch by the per-token scale; no 'both' row (one adapter at a time)")
    return Part(rows, notes)


# ---------------------------------------------------------------------------------------------------
# Part d: training steps
# ---------------------------------------------------------------------------------------------------

def part_training(setup: Setup, model: Flux, deadline: float) -> Part:
    from slideredit.training.losses import DistillationBatch, self_distillation_loss

    dev, dt, rows, notes = setup.device, setup.dtype, [], []
    cases = [(method, px, ckpt) for px in setup.train_px for method in (GSTLORA, STLORA) for ckpt in (True, False)]
    for method, px, ckpt in cases:
        label = {"method": method, "resolution": f"{px}^2", "gradient checkpointing": "on" if ckpt else "off"}
        if out_of_time(deadline):
            rows.append({**label, "step ms (min / median / max)": "skipped: time budget"})
            continue
        random_adapter(model, method, setup.rank, dev, trainable=True)
        model.gradient_checkpointing = ckpt
        optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
        inputs = transformer_inputs(setup, px, seed=5)
        n = inputs["img"].shape[1] // 2
        g = torch.Generator(dev).manual_seed(6)
        rand = lambda *shape: torch.randn(*shape, generator=g, device=dev).to(dt)
        batch = DistillationBatch(
            x=inputs["img"][:, n:], noise=rand(1, n, setup.flux.in_channels), sigma=torch.full((1,), 0.6, device=dev),
            img_ids=inputs["img_ids"], txt_ids=inputs["txt_ids"], guidance=torch.full((1,), 3.5, device=dev, dtype=dt),
            student_txt=inputs["txt"], student_vec=inputs["y"], teacher_txt=rand(*inputs["txt"].shape),
            teacher_vec=rand(*inputs["y"].shape),
            student_scale=1.0 if method == GSTLORA else (text_span_scale(setup, 1.0) > 0).float())

        def step():
            optimizer.zero_grad(set_to_none=True)
            self_distillation_loss(model, method, batch).backward()
            optimizer.step()

        try:
            seconds, peak = time_calls(step, dev, max(1, setup.repeats - 1))
            rows.append({**label, "step ms (min / median / max)": spread_ms(seconds), "peak GiB": fmt_gib(peak)})
        except torch.OutOfMemoryError:
            rows.append({**label, "step ms (min / median / max)": "out of memory", "peak GiB": fmt_gib(peak_gib(dev))})
        finally:
            optimizer = batch = None
            model.gradient_checkpointing = False
            remove_adapters(model)
            model.requires_grad_(False)
            free_memory(dev)
    notes.append(f"batch 1; one step = teacher forward (no grad) + student forward + backward + AdamW on the "
                 f"adapter (rank {setup.rank}, fp32); one warm-up step, then the timed ones; peak over the timed steps")
    return Part(rows, notes)


# ---------------------------------------------------------------------------------------------------
# Part f: the report
# ---------------------------------------------------------------------------------------------------

def machine(setup: Setup) -> dict:
    info = {"setup": setup.name, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    info["triton interpreter"] = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if setup.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    capability=f"{props.major}.{props.minor}")
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
        except (OSError, subprocess.SubprocessError):
            info["driver"] = "unknown (no nvidia-smi)"
    else:
        info["gpu"] = "none (CPU run)"
    with contextlib.suppress(ImportError):
        from kernels import dispatch

        path = dispatch.default_cache_path()
        info["dispatch cache file"] = f"{path} ({'present' if path.exists() else 'absent'} at start)"
    return info


def markdown(info: dict, parts: dict[str, dict]) -> str:
    lines = ["# GPU report", ""] + [f"- {k}: {v}" for k, v in info.items()] + [""]
    for key, part in parts.items():
        lines += [f"## {key}. {part['title']}", "",
                  f"budget {part['budget_s']:.0f} s, took {part['seconds']:.1f} s", ""]
        rows = part["rows"]
        if rows:
            columns = list(dict.fromkeys(c for row in rows for c in row))
            lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
            lines.append("")
        lines += [f"- {note}" for note in part["notes"]] + [""]
    return "\n".join(lines)


def write_report(out: Path, info: dict, parts: dict[str, dict]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(info, parts)
    with atomic_path(out / "report.json") as tmp:
        tmp.write_text(json.dumps({"machine": info, "parts": parts}, indent=1, default=str))
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(text)
    return text


def run(setup: Setup, out: Path, budget_s: float, parts: str = "eabcd") -> dict[str, dict]:
    budgets = {k: BUDGET_SHARES[k] * budget_s for k in parts}
    print(f"{setup.name} on {setup.device}; time budget {budget_s:.0f} s: " +
          ", ".join(f"{k} ({TITLES[k]}) {b:.0f} s" for k, b in budgets.items()), flush=True)
    info = machine(setup)
    torch.backends.cuda.matmul.allow_tf32 = False
    results: dict[str, dict] = {}
    model = None
    if set(parts) & set("cde"):
        start = time.perf_counter()
        model = materialise(lambda: Flux(setup.flux), setup.device, setup.dtype, seed=2)
        info["transformer build s"] = round(time.perf_counter() - start, 2)
    runners = {"e": lambda d: part_edit(setup, model, d), "a": lambda d: part_correctness(setup, d),
               "b": lambda d: part_timing(setup, d), "c": lambda d: part_forward(setup, model, d),
               "d": lambda d: part_training(setup, model, d)}
    deadline = time.perf_counter()
    for key in parts:
        start = time.perf_counter()
        deadline += budgets[key]  # a schedule: a part that overran shortens the next ones, not the total
        print(f"part {key}: {TITLES[key]} (budget {budgets[key]:.0f} s, {deadline - start:.0f} s left for it)",
              flush=True)
        part = guarded(runners[key], deadline, setup.device)
        results[key] = {"title": TITLES[key], "budget_s": budgets[key], "seconds": time.perf_counter() - start,
                        "rows": part.rows, "notes": part.notes}
        print(f"part {key}: {results[key]['seconds']:.1f} s", flush=True)
        write_report(out, info, results)  # after every part: a run cut short still leaves its report
    if "c" in parts:  # the peer last, after ours is freed: both at once would double the weights in memory
        model = None
        free_memory(setup.device)
        start = time.perf_counter()
        peer = guarded(lambda d: part_forward_peer(setup, d), start + BUDGET_SHARES["c"] * budget_s * 0.5, setup.device)
        results["c"]["rows"] += peer.rows
        results["c"]["notes"] += peer.notes
        results["c"]["seconds"] += time.perf_counter() - start
    print(write_report(out, info, results), flush=True)
    return results


def guarded(part: Callable[[float], Part], deadline: float, device: str) -> Part:
    """Run one part; a failure becomes a note (with its last traceback line), so the other parts still run."""
    try:
        return part(deadline)
    except Exception as e:
        import traceback

        where = traceback.extract_tb(e.__traceback__)[-1]
        return Part([], [f"part failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''} "
                         f"({Path(where.filename).name}:{where.lineno})"])
    finally:
        free_memory(device)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder for report.json and report.md")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreted)")
    parser.add_argument("--budget-s", type=float, default=400,
                        help="seconds for all parts together (default: %(default)s; the peer's forward adds at "
                             "most half of part c's share)")
    parser.add_argument("--parts", default="eabcd", help="which parts, in order (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--smoke needs TRITON_INTERPRET=1 before kernels is imported")
        setup = smoke_setup()
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run with --smoke for the CPU version")
        setup = real_setup("cuda")
    if set(args.parts) - set(BUDGET_SHARES):
        parser.error(f"--parts takes letters from {''.join(BUDGET_SHARES)}, got {args.parts!r}")
    return run(setup, args.out, args.budget_s, args.parts)


if __name__ == "__main__":
    main()
