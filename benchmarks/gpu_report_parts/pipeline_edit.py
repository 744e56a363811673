"""A complete edit through SliderEditFluxKontextPipeline, bf16 and then in the low-memory mode (fp8).

bf16: a 28-step 1024^2 edit with a GSTLoRA slider (prompt_embeds: no text encoder; the autoencoder at full
size), a first and a second call; the report runs this part first so that its first call pays what a fresh
process pays: kernel compilation, autotuning, the dispatch measurement.
fp8 (low-memory mode): the same edit end to end from a prompt, with the transformer's block linears
quantized in place (quantize_model(model, fp8_targets(model)): one transformer resident at a time),
GSTLoRA + STLoRA, tiled decode, and random T5 + CLIP at their real sizes (T5-XXL, CLIP-L; the toy model's
tokenizers) placed as from_pretrained places them in this mode: on the host, visiting the device to encode
while the transformer waits on the host. Wall time and peak device memory of a first and a second call,
the peak compared with the 16 GB goal, and each phase's peak beside pipe.memory_plan's. Then bf16 layers
are put back with the same random values, for the parts that time the bf16 model after this one.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from gpu_report_parts.measure import fmt_gib, free_memory, out_of_time, peak_gib, peak_reserved_gib, reset_peak, \
    resident_bytes, spread_ms, sync
from gpu_report_parts.random_models import TRANSFORMER_SEED, fill_random_, materialise, random_adapter, \
    text_span_scale
from gpu_report_parts.setups import SLIDER_LABELS, ST_ALPHA, Part, Setup
from slideredit.autoencoder import AutoEncoder
from slideredit.memory_plan import CLIP_L, PHASES, T5_XXL
from slideredit.quantization import Fp8Linear, fp8_targets, quantize_model
from slideredit.sliders import GSTLORA, STLORA, remove_adapters, set_slider_scale, slider_layers
from slideredit.text_encoders import KontextTextEncoders
from slideredit.transformer import Flux, FluxParams

FP8_MODE = "fp8 (low-memory mode)"
FP8_EDIT_RESERVE = 2.0  # the bf16 second call leaves this many of its first call's walls for the fp8 edit
GOAL_BYTES = 16e9  # the low-memory edit's goal: under 16 GB of device memory
TOKENIZERS = Path(__file__).resolve().parents[2] / "assets" / "toy-kontext"  # tokenizer/ (CLIP), tokenizer_2/ (T5)


@dataclass(frozen=True)
class EditInputs:
    image: object  # PIL image
    embeds: Tensor
    pooled: Tensor
    prompt: str = "make the square darker"  # in the toy tokenizers' vocabulary


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
            text_encoders = random_text_encoders(setup)
            try:
                rows += edit_calls(setup, model, autoencoder, edit, FP8_MODE, (GSTLORA, STLORA), tiled_decode=True,
                                   deadline=deadline, reserve_s=0.0, notes=notes, text_encoders=text_encoders)
            finally:
                del text_encoders
                unquantize_(model, setup.dtype, seed=TRANSFORMER_SEED)
            notes += fp8_goal_notes(rows, dev)
    finally:
        del autoencoder
        free_memory(dev)
    notes.append(f"{setup.edit_px}x{setup.edit_px} edit, {setup.edit_steps} steps, rank {setup.rank} adapters, "
                 f"random weights; bf16: prompt_embeds (no text encoder), GSTLoRA at slider_alpha 0.5, untiled "
                 f"decode; {FP8_MODE}: a prompt through random T5 and CLIP (T5-XXL and CLIP-L at the real shapes; text encoding "
                 f"included), the transformer's block linears fp8 (fp8_targets), GSTLoRA at 0.5 + STLoRA at "
                 f"{ST_ALPHA} on one span of text tokens (set at step 0 by a hook: random encoders, no "
                 "sub-prompts), tiled decode; phase columns: measured peak allocated / pipe.memory_plan's, in GB")
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


def random_text_encoders(setup: Setup) -> KontextTextEncoders:
    """T5 and CLIP with random weights, on the host as the low-memory mode keeps them between encodes:
    T5-XXL and CLIP-L at the real shapes, tiny ones at the smoke shapes (widths of the setup's transformer);
    the toy model's tokenizers (their ids fit either vocabulary). Made on the device (quickly filled), then
    moved to the host."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    clip_tokenizer = CLIPTokenizer.from_pretrained(TOKENIZERS / "tokenizer")
    t5_tokenizer = T5TokenizerFast.from_pretrained(TOKENIZERS / "tokenizer_2")
    p, dev = setup.flux, setup.device
    if p == FluxParams.kontext_dev():
        t5_config, clip_config = T5_XXL, CLIP_L
    else:
        t5_config = dict(d_model=p.context_in_dim, d_kv=8, d_ff=2 * p.context_in_dim, num_layers=1, num_heads=4,
                         vocab_size=len(t5_tokenizer), feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                         use_cache=False)
        clip_config = dict(vocab_size=len(clip_tokenizer), hidden_size=p.vec_in_dim, intermediate_size=2 * p.vec_in_dim,
                           num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                           projection_dim=p.vec_in_dim, hidden_act="quick_gelu", bos_token_id=0, pad_token_id=1,
                           eos_token_id=2)  # the ids of CLIP-L's config, in any vocabulary
    t5 = materialise(lambda: T5EncoderModel(T5Config(**t5_config)), dev, setup.dtype, seed=4)
    with torch.device(dev):  # CLIP's position ids are a buffer, which materialise cannot fill: built in place
        clip = fill_random_(CLIPTextModel(CLIPTextConfig(**clip_config)).to(setup.dtype), seed=5)
    return KontextTextEncoders(clip, clip_tokenizer, t5, t5_tokenizer).requires_grad_(False).to("cpu")


def edit_calls(setup: Setup, model: Flux, autoencoder: AutoEncoder, edit: EditInputs, mode: str,
               sliders: tuple[str, ...], tiled_decode: bool, deadline: float, reserve_s: float,
               notes: list[str], text_encoders: KontextTextEncoders | None = None) -> list[dict]:
    """A first and a second edit through the pipeline with random `sliders` on `model`: one row each
    (wall time, per-step times, peak memory). With `text_encoders` the edit starts from a prompt, placed as
    in the low-memory mode (offload and model_offload), and each row holds each phase's peak beside the plan.
    The second is skipped if it would not end `reserve_s` first-call walls before the deadline; the
    adapters are removed again."""
    from slideredit.pipelines import EditDefaults, SliderEditFluxKontextPipeline

    dev = setup.device
    offload = text_encoders is not None
    pipe = SliderEditFluxKontextPipeline(model, autoencoder, text_encoders,
                                         defaults=EditDefaults(max_sequence_length=setup.text_tokens),
                                         offload=offload, model_offload=offload, tiled_decode=tiled_decode)
    pipe.set_progress_bar_config(disable=True)
    for seed, name in enumerate(sliders, start=1):
        random_adapter(model, name, setup.rank, dev, seed=seed)
    plan = pipe.memory_plan(setup.edit_px, setup.edit_px) if offload else None
    phases = PhasePeaks(pipe, dev) if offload else None
    prompt = dict(prompt=edit.prompt) if offload else dict(prompt_embeds=edit.embeds, pooled_prompt_embeds=edit.pooled)
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
            at_rest = allocated_bytes(dev)
            start = time.perf_counter()
            images = pipe(image=edit.image, **prompt, num_inference_steps=setup.edit_steps, guidance_scale=2.5,
                          height=setup.edit_px, width=setup.edit_px, auto_resize=setup.edit_px >= 512,
                          generator=torch.Generator().manual_seed(0), output_type="pt", slider_alpha=0.5).images
            sync(dev)
            seconds = time.perf_counter() - start
            measured = phases.finish(load=at_rest) if phases is not None else {}
            steps = sorted(step_times)
            rows.append({"mode": mode, "sliders": " + ".join(SLIDER_LABELS[n] for n in sliders),
                         "on every step": " + ".join(SLIDER_LABELS[n] for n in sliders if n in always_on) or "none",
                         "call": call, "wall s": f"{seconds:.2f}",
                         "steps": len(step_times), "step ms (min / median / max)": spread_ms(step_times),
                         "first step - median step ms": f"{(step_times[0] - statistics.median(steps)) * 1e3:.1f}",
                         "rest of the edit s (VAE, sampling)": f"{seconds - sum(step_times):.2f}",
                         "peak GiB": fmt_gib(peak_gib(dev)), "peak reserved GiB": fmt_gib(peak_reserved_gib(dev)),
                         "transformer GiB": f"{resident_bytes(model) / 2**30:.3g}",
                         "output finite": bool(torch.isfinite(images).all()),
                         **({} if plan is None else phase_columns(measured, plan))})
            images = None
    except torch.OutOfMemoryError:
        notes.append(f"{mode}: out of memory during the edit")
    finally:
        pre.remove()
        post.remove()
        if phases is not None:
            phases.remove()
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


class PhasePeaks:
    """Peak allocated device memory of each phase of one pipeline call: text_encoding from encode_prompt's
    call (the transformer leaving and T5 arriving count), image_encoding from encode_image's, denoising
    from the transformer's first call, decoding from the decoder's first layer; each ends where the next
    starts. None on the CPU (nothing to measure)."""

    def __init__(self, pipe, device: str):
        self.device, self.pipe, self.peaks, self.current = device, pipe, {}, None
        for phase, method in (("text_encoding", "encode_prompt"), ("image_encoding", "encode_image")):
            setattr(pipe, method, self._starting(phase, getattr(pipe, method)))
        self.hooks = [module.register_forward_pre_hook(lambda module, args, phase=phase: self.start(phase))
                      for phase, module in (("denoising", pipe.transformer),
                                            ("decoding", pipe.autoencoder.decoder.conv_in))]

    def _starting(self, phase: str, method):
        def wrapped(*args, **kwargs):
            self.start(phase)
            return method(*args, **kwargs)
        return wrapped

    def start(self, phase: str) -> None:
        if phase != self.current:
            self._end()
            sync(self.device)
            reset_peak(self.device)
            self.current = phase

    def _end(self) -> None:
        if self.current is not None:
            sync(self.device)
            peak = peak_gib(self.device)
            self.peaks[self.current] = None if peak is None else peak * 2**30
        self.current = None

    def finish(self, load: int | None) -> dict[str, float | None]:
        """-> phase -> peak bytes of the call that just ended (load: what was allocated at rest before it)."""
        self._end()
        peaks, self.peaks = {"load": load, **self.peaks}, {}
        return peaks

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        for method in ("encode_prompt", "encode_image"):
            delattr(self.pipe, method)


def allocated_bytes(device: str) -> int | None:
    return torch.cuda.memory_allocated() if device == "cuda" else None


def phase_columns(measured: dict[str, float | None], plan: dict) -> dict[str, str]:
    """One column per phase: measured peak / planned peak, GB (n/a on the CPU)."""
    def gb(value: float | None) -> str:
        return "n/a" if value is None else f"{value / 1e9:.2f}"
    return {f"{phase} GB (measured / plan)": f"{gb(measured.get(phase))} / {gb(plan[phase].peak)}" for phase in PHASES}


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
            f"({GOAL_BYTES / 2**30:.2f} GiB), text encoding included (T5 and CLIP visit the device while the "
            "transformer waits on the host)"]


def wall_estimate(rows: list[dict]) -> float:
    return float(rows[-1]["wall s"]) if rows else 0.0
