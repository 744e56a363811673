"""A full transformer forward (2 x 4096 image + 512 text tokens at 1024^2): base, GSTLoRA, STLoRA, both,
and both with torch.compile'd blocks (alphas moving every call, no recompilation allowed); then diffusers'
FluxTransformer2DModel + peft beside it when importable (`measure_peer`, run after ours is freed)."""
from __future__ import annotations

import time

import torch
from torch import Tensor

from gpu_report_parts.measure import fmt_gib, free_memory, out_of_time, spread_ms, time_calls, wall
from gpu_report_parts.random_models import materialise, random_adapter, text_span_scale, transformer_inputs
from gpu_report_parts.setups import GST_ALPHA, ST_ALPHA, Part, Setup, dtype_name
from slideredit.compile import compile_blocks, uncompile_blocks
from slideredit.sliders import GSTLORA, STLORA, remove_adapters, set_slider_scale
from slideredit.transformer import Flux


def measure(setup: Setup, model: Flux, deadline: float) -> Part:
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
                    rows.append({"model": "ours", "variant": name,
                                 "ms per forward (min / median / max)": spread_ms(seconds), "peak GiB": fmt_gib(peak)})
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


def measure_peer(setup: Setup, deadline: float) -> Part:
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
