"""Everything this project needs measured on a GPU, in one command that fits a short GPU loan.

    python benchmarks/gpu_report.py --out reports/h100          # one H100/H200: <= 8 minutes
    python benchmarks/gpu_report.py --out /tmp/smoke --smoke    # the same code at tiny shapes, CPU

Random weights at the real FLUX.1 Kontext [dev] shapes (built on the meta device, materialised with
torch.empty on the GPU and filled with small random values: nothing is downloaded and nothing is ever
allocated on the CPU), bf16. The parts, run in this order:
  e  a complete 28-step 1024^2 edit through SliderEditFluxKontextPipeline with a GSTLoRA slider
     (prompt_embeds: no text encoder; the autoencoder at full size). It runs first so that its first
     call pays what a fresh process pays: kernel compilation, autotuning, the dispatch measurement.
     Then the fp8 rows, "fp8 (low-memory mode)": the same edit with the transformer's block linears
     quantized in place (quantize_model(model, fp8_targets(model)): one transformer resident at a
     time), GSTLoRA + STLoRA, tiled decode, text encoders offloaded (none on the device): wall time
     and peak device memory of a first and a second call, the peak compared with the 16 GB goal;
     then bf16 layers are put back with the same random values for c and d
  a  kernel correctness at every adapted layer shape (M = 8704 and 512, K = 1, 2, 4, r = 16, 32, bf16
     and fp16, forward and backward) against fp32 math; then fp8 weights (float8_e4m3fn + row scales,
     weight_scale=) at every layer shape, both M, K = 2, r = 16, bf16 and fp16 x, forward and backward
     (dX, dA, dB) against fp32 math on the dequantized weight
  b  timing per layer shape: bare F.linear, fused Triton, the PyTorch path, an unfused PEFT-style layer,
     and backend=None ("auto"): what it chose, overhead over bare against the FLOP bound; then fp8
     rows at every layer shape, both M, K = 2 (the last 30 % of b's slot is kept for them): fused
     Triton reading fp8 with the adapters and without (fp8_linear), and the PyTorch path (dequantize
     + GEMM), as % over bare bf16 F.linear
  c  a full transformer forward (2 x 4096 image + 512 text tokens): base, GSTLoRA, STLoRA, both, and both
     with torch.compile'd blocks (alphas moving every call, no recompilation allowed); then diffusers'
     FluxTransformer2DModel + peft beside it when importable
  d  one GSTLoRA and one STLoRA training step (self-distillation loss, AdamW) at 512^2 and 1024^2,
     gradient checkpointing on and off
  f  report.json and report.md in --out (GPU, driver, torch, triton), the markdown also printed.
Each part has a time budget (printed first; 400 s in all, plus at most 34 s for the peer and the
model build: about 7.6 minutes, with headroom for a case that compiles past its slot): e 108 s (22 %
before the fp8 rows, 27 % now: the 5 % came from d, now 80 s), a 88 s, b 56 s, c 68 s, d 80 s. A part
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

from slideredit.kernels.masked_lora import fp8_linear, masked_lora_linear  # noqa: E402
from slideredit.atomic import atomic_path  # noqa: E402
from slideredit.compile import compile_blocks, uncompile_blocks  # noqa: E402
from slideredit.autoencoder import AutoEncoder, AutoEncoderParams  # noqa: E402
from slideredit.quantization import Fp8Linear, dequantize, fp8_targets, quantize_model, quantize_rows  # noqa: E402
from slideredit.sampling import latent_ids, text_ids  # noqa: E402
from slideredit.sliders import GSTLORA, STLORA, TARGETS, add_adapter, is_fused_qkv, part_rows, \
    remove_adapters, set_slider_scale, slider_layers  # noqa: E402
from slideredit.transformer import Flux, FluxParams  # noqa: E402

# Agreement with fp32 math, relative to the output's scale: 4 units of the dtype's precision (both sides
# accumulate in fp32 from the same rounded inputs; ours rounds the output and H~ once).
TOLERANCE = {torch.bfloat16: 4 * 2.0**-7, torch.float16: 4 * 2.0**-10}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
GST_ALPHA, ST_ALPHA = 0.7, 0.8
SLIDER_LABELS = {GSTLORA: "GSTLoRA", STLORA: "STLoRA"}


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
# e grew by the fp8 edit (2 more 28-step edits) and took it from d, whose 8 training steps had the most slack.
BUDGET_SHARES = {"e": 0.27, "a": 0.22, "b": 0.14, "c": 0.17, "d": 0.20}
TITLES = {"e": "28-step edit through the pipeline, bf16 and fp8", "a": "kernel correctness against fp32 math",
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


def peak_reserved_gib(device: str) -> float | None:
    """What the caching allocator held at most: closer to what the device must have free than peak_gib."""
    return torch.cuda.max_memory_reserved() / 2**30 if device == "cuda" else None


def resident_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (fp8 weights: one per element)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


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
    """The bf16 edit (GSTLoRA), then the low-memory mode's (fp8 transformer, GSTLoRA + STLoRA, tiled decode).

    The fp8 row quantizes `model` in place (one layer at a time, so only one transformer is ever resident:
    a copy beside the bf16 one would add its 24 GB to the peak we want to compare with 16 GB), then puts
    bf16 layers back with the same random values (parts c and d time the bf16 model)."""
    from PIL import Image

    dev, rows, notes = setup.device, [], []
    autoencoder = materialise(lambda: AutoEncoder(setup.autoencoder), dev, setup.dtype, seed=3)
    g = torch.Generator(dev).manual_seed(0)
    embeds = torch.randn(1, setup.text_tokens, setup.flux.context_in_dim, generator=g, device=dev).to(setup.dtype)
    pooled = torch.randn(1, setup.flux.vec_in_dim, generator=g, device=dev).to(setup.dtype)
    pixels = torch.randint(0, 256, (setup.edit_px, setup.edit_px, 3), generator=torch.Generator().manual_seed(0))
    edit = EditInputs(Image.fromarray(pixels.to(torch.uint8).numpy()), embeds, pooled)
    try:
        bf16 = edit_calls(setup, model, autoencoder, edit, "bf16", (GSTLORA,), tiled_decode=False,
                          deadline=deadline, reserve_s=FP8_EDIT_RESERVE, notes=notes)
        rows += bf16
        if out_of_time(deadline - wall_estimate(bf16[:1])):  # bf16's first call: about what the fp8 one takes
            notes.append(f"{FP8_MODE}: edit skipped: it would overrun this part's time budget")
        else:  # also after a bf16 out of memory: the low-memory mode is what a small device runs
            start = time.perf_counter()
            quantize_model(model, fp8_targets(model))
            sync(dev)
            notes.append(f"{FP8_MODE}: {len(fp8_targets(model))} block linears quantized on the device in "
                         f"{time.perf_counter() - start:.1f} s (quantize_model, per-row scales)")
            try:
                rows += edit_calls(setup, model, autoencoder, edit, FP8_MODE, (GSTLORA, STLORA), tiled_decode=True,
                                   deadline=deadline, reserve_s=0.0, notes=notes)
            finally:
                unquantize_(model, setup.dtype, seed=2)  # run() built it with seed 2
            notes += fp8_goal_notes(rows, dev)
    finally:
        del autoencoder
        free_memory(dev)
    notes.append(f"{setup.edit_px}x{setup.edit_px} edit, {setup.edit_steps} steps, rank {setup.rank} adapters, "
                 f"random weights, prompt_embeds (no text encoder: the text encoders hold 0 bytes on the device, "
                 f"as offloaded); bf16: GSTLoRA at slider_alpha 0.5, untiled decode; {FP8_MODE}: the transformer's "
                 f"block linears fp8 (fp8_targets), GSTLoRA at 0.5 + STLoRA at {ST_ALPHA} on one span of text "
                 "tokens (set at step 0 by a hook: without a tokenizer there are no sub-prompts), tiled decode")
    return Part(rows, notes)


FP8_MODE = "fp8 (low-memory mode)"
FP8_EDIT_RESERVE = 2.0  # the bf16 second call leaves this many of its first call's walls for the fp8 edit
GOAL_BYTES = 16e9  # the goal: the low-memory edit under 16 GB of device memory


@dataclass(frozen=True)
class EditInputs:
    image: object  # PIL image
    embeds: Tensor
    pooled: Tensor


def edit_calls(setup: Setup, model: Flux, autoencoder: AutoEncoder, edit: EditInputs, mode: str,
               sliders: tuple[str, ...], tiled_decode: bool, deadline: float, reserve_s: float,
               notes: list[str]) -> list[dict]:
    """A first and a second edit through the pipeline with random `sliders` on `model`: one row each
    (wall time, per-step times, peak memory). The second is skipped if it would not end `reserve_s`
    first-call walls before the deadline; the adapters are removed again."""
    from slideredit.pipelines import SliderEditFluxKontextPipeline

    dev = setup.device
    pipe = SliderEditFluxKontextPipeline(model, autoencoder, text_encoders=None, tiled_decode=tiled_decode)
    pipe.set_progress_bar_config(disable=True)
    for seed, name in enumerate(sliders, start=1):
        random_adapter(model, name, setup.rank, dev, seed=seed)
    span = text_span_scale(setup, ST_ALPHA) if STLORA in sliders else None
    step_times: list[float] = []  # seconds of each transformer call (one per sampling step)
    started = [0.0]

    def before_step(module, args) -> None:  # hooks return None: anything else would replace args / output
        if span is not None and not step_times:  # step 0, after the pipeline switched STLoRA off (it has no
            set_slider_scale(model, STLORA, span)  # sub-prompts); it changes nothing later, so the span stays
        sync(dev)
        started[0] = time.perf_counter()

    def after_step(module, args, output) -> None:
        sync(dev)
        step_times.append(time.perf_counter() - started[0])
        on = {n for _, layer in slider_layers(model) for n, a in layer.adapters.items() if a.scale is not None}
        always_on.intersection_update(on)  # outside the step's time: which sliders really ran, every step

    pre, post = model.register_forward_pre_hook(before_step), model.register_forward_hook(after_step)
    rows: list[dict] = []
    always_on: set[str] = set()
    try:
        for call in ("first call", "second call"):
            if call == "second call" and out_of_time(deadline - (1 + reserve_s) * wall_estimate(rows)):
                notes.append(f"{mode}: second edit skipped: it would overrun this part's time budget")
                break
            step_times.clear()
            always_on.update(sliders)
            free_memory(dev)
            reset_peak(dev)
            start = time.perf_counter()
            images = pipe(image=edit.image, prompt_embeds=edit.embeds, pooled_prompt_embeds=edit.pooled,
                          num_inference_steps=setup.edit_steps, guidance_scale=2.5, height=setup.edit_px,
                          width=setup.edit_px, auto_resize=setup.edit_px >= 512,
                          generator=torch.Generator().manual_seed(0), output_type="pt", slider_alpha=0.5).images
            sync(dev)
            seconds = time.perf_counter() - start
            steps = sorted(step_times)
            rows.append({"mode": mode, "sliders": " + ".join(SLIDER_LABELS[n] for n in sliders),
                         "on every step": " + ".join(SLIDER_LABELS[n] for n in sliders if n in always_on) or "none",
                         "call": call, "wall s": f"{seconds:.2f}",
                         "steps": len(step_times), "step ms (min / median / max)": spread_ms(step_times),
                         "first step - median step ms": f"{(step_times[0] - statistics.median(steps)) * 1e3:.1f}",
                         "rest of the edit s (VAE, sampling)": f"{seconds - sum(step_times):.2f}",
                         "peak GiB": fmt_gib(peak_gib(dev)), "peak reserved GiB": fmt_gib(peak_reserved_gib(dev)),
                         "transformer GiB": f"{resident_bytes(model) / 2**30:.3g}",
                         "output finite": bool(torch.isfinite(images).all())})
            images = None
    except torch.OutOfMemoryError:
        notes.append(f"{mode}: out of memory during the edit")
    finally:
        pre.remove()
        post.remove()
        remove_adapters(model)
        del pipe
        free_memory(dev)
    if len(rows) == 2:
        overhead = float(rows[0]["wall s"]) - float(rows[1]["wall s"])
        notes.append(f"{mode}: first-call overhead (compilation, autotuning, dispatch measurement, allocator "
                     f"warm-up): {overhead:.2f} s = first call - second call")
    return rows


@torch.no_grad()
def unquantize_(model: Flux, dtype: torch.dtype, seed: int) -> None:
    """Put bf16 nn.Linear layers back where quantize_model left Fp8Linear ones, then refill the whole model
    with `seed`'s random values: bit for bit what materialise built (the same parameters in the same order)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Fp8Linear):
            parent_name, _, child = name.rpartition(".")
            with torch.device("meta"):
                linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype)
            setattr(model.get_submodule(parent_name), child, linear.to_empty(device=module.weight.device))
    fill_random_(model, seed).requires_grad_(False)


def fp8_goal_notes(rows: list[dict], device: str) -> list[str]:
    """The low-memory edit's peak against the 16 GB goal (allocated tensors; the CUDA context and the
    allocator's cache come on top: the reserved peak is in the row too)."""
    fp8 = [row for row in rows if row["mode"] == FP8_MODE]
    if not fp8:
        return [f"{FP8_MODE}: no edit completed, nothing to compare with the 16 GB goal"]
    if device != "cuda":
        return [f"{FP8_MODE}: peak vs the 16 GB goal: n/a (CPU run)"]
    peak = max(float(row["peak GiB"]) for row in fp8)
    verdict = "under" if peak * 2**30 < GOAL_BYTES else "OVER"
    return [f"{FP8_MODE}: peak {peak:.2f} GiB = {peak * 2**30 / 1e9:.2f} GB allocated: {verdict} the 16 GB goal "
            f"({GOAL_BYTES / 2**30:.2f} GiB), text encoders offloaded (0 bytes on the device)"]


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
    """bf16 / fp16 weights at every case, then fp8 weights (float8_e4m3fn + row scales) at every layer shape
    with the two sliders' K: the fp8 cases are few and cheap, so they share the slot without a reserve."""
    rows, notes, skipped = [], [], 0
    text_m = min(setup.kernel_tokens)
    cases = [(r, dtype, M, name, shape, K, False) for r in setup.ranks for dtype in setup.dtypes
             for M in setup.kernel_tokens for name, shape in setup.layer_shapes().items() for K in setup.ks]
    cases += [(setup.ranks[0], dtype, M, name, shape, fp8_k(setup), True) for dtype in setup.dtypes
              for M in setup.kernel_tokens for name, shape in setup.layer_shapes().items()]
    for r, dtype, M, name, (d_in, d_out), K, fp8 in cases:
        if out_of_time(deadline):
            skipped += 1
            continue
        row = {"layer": name, "d_in->d_out": f"{d_in}->{d_out}", "M": M, "K": K, "r": r, "dtype": dtype_name(dtype),
               "weights": "fp8" if fp8 else dtype_name(dtype)}
        gen = torch.Generator(setup.device).manual_seed(M + d_in + d_out + K + r)
        try:
            row.update(check_case(make_set(M, d_in, d_out, K, r, live_rows(M, M == text_m), dtype, setup.device, gen),
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


def fp8_k(setup: Setup) -> int:
    """K of the fp8 rows: 2, GSTLoRA + STLoRA as the low-memory edit runs them (else the largest K there is)."""
    return 2 if 2 in setup.ks else max(setup.ks)


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


# ---------------------------------------------------------------------------------------------------
# Part b: timing per layer shape
# ---------------------------------------------------------------------------------------------------

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


FP8_TIMING_SHARE = 0.3  # of part b's slot, kept for the fp8 rows (they run after the bf16 ones)


def fp8_timing(setup: Setup, deadline: float, cache_bytes: int, repeats: int, warmup: int) -> tuple[list[dict], int]:
    """fp8 weights at every layer shape, K of the two sliders: bare bf16 F.linear (the cost to beat), the
    fused Triton GEMM reading fp8 with the adapters and without (fp8_linear), and the PyTorch path
    (dequantize per call, then the bf16 GEMMs), as % over bare bf16. -> (rows, shapes skipped)."""
    dev, dtype, r, K = setup.device, setup.dtype, setup.ranks[0], fp8_k(setup)
    timer = interleaved_times_cuda if dev == "cuda" else interleaved_times_cpu
    rows, skipped, text_m = [], 0, min(setup.kernel_tokens)
    for M in setup.kernel_tokens:
        for name, (d_in, d_out) in setup.layer_shapes().items():
            if out_of_time(deadline):
                skipped += 1
                continue
            live = live_rows(M, M == text_m)
            gen = torch.Generator(dev).manual_seed(M + d_in + d_out + K)
            row = {"weights": "fp8", "layer": name, "d_in->d_out": f"{d_in}->{d_out}", "M": M,
                   "live": live.stop - live.start, "K": K}
            try:
                sets = cache_busting_sets(lambda: fp8_set(make_set(M, d_in, d_out, K, r, live, dtype, dev, gen)),
                                          lambda s: sum(s[n].numel() * s[n].element_size()  # what the fp8 variants read
                                                        for n in ("x", "fp8", "weight_scale", "bias", "lora_a",
                                                                  "lora_b", "scale")),
                                          cache_bytes)
                fns = {"bare": [], "triton": [], "triton no adapter": [], "torch": []}
                for s in sets:
                    args = (s["x"], s["fp8"], s["bias"], s["lora_a"], s["lora_b"], s["scale"])
                    fns["bare"].append(lambda s=s: F.linear(s["x"], s["weight"], s["bias"]))
                    for backend in ("triton", "torch"):
                        fns[backend].append(lambda args=args, s=s, backend=backend: masked_lora_linear(
                            *args, backend=backend, weight_scale=s["weight_scale"]))
                    fns["triton no adapter"].append(
                        lambda s=s: fp8_linear(s["x"], s["fp8"], s["weight_scale"], s["bias"], backend="triton"))
                with torch.inference_mode():
                    times = timer(fns, repeats, warmup)
                row["bare ms"] = f"{statistics.median(times['bare']) * 1e3:.3f}"
                for key in ("triton", "triton no adapter", "torch"):
                    row[f"{key} % over bare (min/med/max)"] = ratio_spread(times[key], times["bare"])
                row["auto chose"] = "not run (fp8 rows: backends forced)"
            except torch.OutOfMemoryError:
                row["auto chose"] = "out of memory"
            except Exception as e:
                row["auto chose"] = error_text(e)
            rows.append(row)
            sets = fns = None
            free_memory(dev)
    return rows, skipped


def error_text(e: Exception) -> str:
    """A failed case's cell: the exception's type and first line (a compile or launch failure is a finding)."""
    return f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def cache_busting_sets(make: Callable[[], dict], nbytes: Callable[[dict], int], cache_bytes: int) -> list[dict]:
    """At least two input sets, and enough that cycling through them reads twice the L2 cache: every
    timed call starts from cold operands, as inside a real forward."""
    first = make()
    return [first] + [make() for _ in range(max(2, math.ceil(2 * cache_bytes / nbytes(first))) - 1)]


def fp8_set(s: dict) -> dict:
    """A make_set input set plus its weight quantized per row; the bf16 weight stays for bare F.linear."""
    q, scale = quantize_rows(s["weight"])
    return {**s, "fp8": q, "weight_scale": scale}


def ratio_spread(times: list[float], bare: list[float]) -> str:
    """% over bare per repetition (the same round), min / median / max."""
    ratios = sorted(t / b - 1 for t, b in zip(times, bare))
    return f"{100 * ratios[0]:+.1f} / {100 * statistics.median(ratios):+.1f} / {100 * ratios[-1]:+.1f}"


def part_timing(setup: Setup, deadline: float) -> Part:
    dev, dtype, r = setup.device, setup.dtype, setup.ranks[0]
    timer = interleaved_times_cuda if dev == "cuda" else interleaved_times_cpu
    cache_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20) if dev == "cuda" else 0
    repeats, warmup = (20, 5) if dev == "cuda" else (setup.repeats, 1)
    rows, notes, skipped = [], [], 0
    text_m = min(setup.kernel_tokens)
    cases = [(M, name, shape, K) for M in setup.kernel_tokens for name, shape in setup.layer_shapes().items()
             for K in setup.ks]
    bf16_deadline = deadline - FP8_TIMING_SHARE * max(0.0, deadline - time.perf_counter())
    for M, name, (d_in, d_out), K in cases:
        if out_of_time(bf16_deadline):
            skipped += 1
            continue
        live = live_rows(M, M == text_m)
        gen = torch.Generator(dev).manual_seed(M + d_in + d_out + K)
        row = {"weights": dtype_name(dtype), "layer": name, "d_in->d_out": f"{d_in}->{d_out}", "M": M,
               "live": live.stop - live.start, "K": K}
        try:
            sets = cache_busting_sets(lambda: make_set(M, d_in, d_out, K, r, live, dtype, dev, gen),
                                      lambda s: sum(t.numel() * t.element_size() for t in s.values()
                                                    if isinstance(t, Tensor)),
                                      cache_bytes)
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
                row[f"{key} % over bare (min/med/max)"] = ratio_spread(times[key], times["bare"])
            row["FLOP bound %"] = f"+{100 * lora_flops / (2 * M * d_in * d_out):.2f}"
            row["auto chose"] = auto_choice(M, d_in, d_out, K * r)
        except torch.OutOfMemoryError:
            row["auto chose"] = "out of memory"
        except Exception as e:
            row["auto chose"] = error_text(e)
        rows.append(row)
        sets = fns = None
        free_memory(dev)
    fp8_rows, fp8_skipped = fp8_timing(setup, deadline, cache_bytes, repeats, warmup)
    rows += fp8_rows
    if skipped or fp8_skipped:
        notes.append(f"{skipped} of {len(cases)} {dtype_name(dtype)} and {fp8_skipped} of "
                     f"{len(setup.kernel_tokens) * len(setup.layer_shapes())} fp8 shapes not timed: this part's time "
                     f"budget ran out (the fp8 rows keep the last {FP8_TIMING_SHARE:.0%} of it)")
    notes.append(f"{dtype_name(dtype)}, r = {r}; {repeats} interleaved repetitions over rotating input sets "
                 f"larger than twice the L2 cache; % over bare per repetition (same round), min / median / max; "
                 "FLOP bound = the low-rank FLOPs over the base GEMM's (KERNEL.md); auto = backend=None")
    notes.append(f"weights fp8: float8_e4m3fn + fp32 row scales (quantize_rows), K = {fp8_k(setup)} (GSTLoRA + "
                 f"STLoRA), x {dtype_name(dtype)}; bare = bf16 F.linear on the unquantized weight; triton = "
                 "masked_lora_linear(weight_scale=) forced to Triton, triton no adapter = fp8_linear, torch = the "
                 "PyTorch path (dequantizes the weight every call, then bf16 GEMMs)")
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
        from slideredit.kernels import dispatch

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
