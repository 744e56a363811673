"""A complete edit through SliderEditFluxKontextPipeline, bf16 and then in the low-memory mode (fp8).

bf16: a 28-step 1024^2 edit with a GSTLoRA slider (prompt_embeds: no text encoder; the autoencoder at full
size), a first and a second call; the report runs this part first so that its first call pays what a fresh
process pays: kernel compilation, autotuning, the dispatch measurement.
fp8 (low-memory mode): the same edit with the transformer's block linears quantized in place
(quantize_model(model, fp8_targets(model)): one transformer resident at a time), GSTLoRA + STLoRA, tiled
decode, text encoders offloaded (none on the device): wall time and peak device memory of a first and a
second call, the peak compared with the 16 GB goal. Then bf16 layers are put back with the same random
values, for the parts that time the bf16 model after this one.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gpu_report_parts.measure import fmt_gib, free_memory, out_of_time, peak_gib, peak_reserved_gib, reset_peak, \
    resident_bytes, spread_ms, sync
from gpu_report_parts.random_models import TRANSFORMER_SEED, fill_random_, materialise, random_adapter, \
    text_span_scale
from gpu_report_parts.setups import SLIDER_LABELS, ST_ALPHA, Part, Setup
from slideredit.autoencoder import AutoEncoder
from slideredit.quantization import Fp8Linear, fp8_targets, quantize_model
from slideredit.sliders import GSTLORA, STLORA, remove_adapters, set_slider_scale, slider_layers
from slideredit.transformer import Flux

FP8_MODE = "fp8 (low-memory mode)"
FP8_EDIT_RESERVE = 2.0  # the bf16 second call leaves this many of its first call's walls for the fp8 edit
GOAL_BYTES = 16e9  # the low-memory edit's goal: under 16 GB of device memory


@dataclass(frozen=True)
class EditInputs:
    image: object  # PIL image
    embeds: Tensor
    pooled: Tensor


def measure(setup: Setup, model: Flux, deadline: float) -> Part:
    """The bf16 edit (GSTLoRA), then the low-memory mode's (fp8 transformer, GSTLoRA + STLoRA, tiled decode).

    The fp8 rows quantize `model` in place (one layer at a time, so only one transformer is ever resident:
    a copy beside the bf16 one would add its 24 GB to the peak we want to compare with 16 GB), then put
    bf16 layers back with the same random values (the forward and training parts time the bf16 model)."""
    dev, rows, notes = setup.device, [], []
    autoencoder = materialise(lambda: AutoEncoder(setup.autoencoder), dev, setup.dtype, seed=3)
    edit = edit_inputs(setup)
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
                unquantize_(model, setup.dtype, seed=TRANSFORMER_SEED)
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


def edit_inputs(setup: Setup) -> EditInputs:
    """A random RGB image of the edit's size and random T5 / CLIP embeddings in place of a text encoder."""
    from PIL import Image

    dev = setup.device
    g = torch.Generator(dev).manual_seed(0)
    embeds = torch.randn(1, setup.text_tokens, setup.flux.context_in_dim, generator=g, device=dev).to(setup.dtype)
    pooled = torch.randn(1, setup.flux.vec_in_dim, generator=g, device=dev).to(setup.dtype)
    pixels = torch.randint(0, 256, (setup.edit_px, setup.edit_px, 3), generator=torch.Generator().manual_seed(0))
    return EditInputs(Image.fromarray(pixels.to(torch.uint8).numpy()), embeds, pooled)


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
