"""SliderEditFluxKontextPipeline: instruction-based editing with FLUX.1 Kontext [dev].

One edit (`__call__`) in four steps: check every argument; prepare the Kontext inputs (encode the
prompt: T5 per token, CLIP pooled; `prepare_kontext`: encode the context image with the autoencoder
and pack it into tokens with first position id 1, draw noise for the target); denoise (Euler steps,
sampling.denoise, over a velocity that sets the step's slider scales, runs the model on [noisy ;
context] tokens and combines true CFG); unpack and decode. The import path `slideredit.pipelines` is
the one the SliderEdit release's examples use.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from .autoencoder import AutoEncoder, load_autoencoder
from .checkpoint import CheckpointError, download_from_hub
from .compile import compile_blocks
from .hub import hub_problem, looks_like_repo_id
from .image import ImageInput, area_scaled_size, default_output_size, prepare_context_image
from .memory_plan import MemoryPlan, components, module_bytes, plan_edit
from .slider_checkpoints import load_adapter
from .sliders import GSTLORA, STLORA, loaded_adapters, remove_adapters, set_slider_scale
from .slider_schedule import Alpha, SliderSchedule, alpha_batch, check_windows
from .token_selection import is_number, subprompt_spans
from .sampling import (KontextInputs, StepEnd, Velocity, denoise, get_schedule, initial_noise, kontext_velocity,
                       latent_ids, pack_latents, text_ids, unpack_latents)
from .text_encoders import SUBFOLDERS, KontextTextEncoders, check_encoder_files
from .transformer import Flux
from .transformer_loading import QUANTIZE_MODES, load_flux

# What one edit needs from a diffusers-layout Kontext repository (BFL's single files are not fetched).
HUB_PATTERNS = ["model_index.json", "scheduler/*", "transformer/*", "vae/*"] + [f"{name}/*" for name in SUBFOLDERS]
# Tensors a step-end callback may ask for (diffusers' FluxKontextPipeline offers the first two).
CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
                          "negative_pooled_prompt_embeds")
StepEndCallback = Callable[["SliderEditFluxKontextPipeline", int, Tensor, dict], dict | None]


@dataclass
class KontextOutput:
    images: list[Image.Image] | Tensor  # PIL images, or (B, 3, H, W) in [0, 1] for output_type="pt"


@dataclass(frozen=True)
class ScheduleConfig:
    """The shift of the flow-matching schedule (diffusers' scheduler_config.json field names)."""
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15

    @classmethod
    def from_folder(cls, folder: Path) -> "ScheduleConfig":
        path = folder / "scheduler" / "scheduler_config.json"
        if not path.is_file():
            return cls()
        config = json.loads(path.read_text())
        return cls(**{k: config[k] for k in cls.__dataclass_fields__ if k in config})

    def timesteps(self, num_steps: int, image_seq_len: int) -> list[float]:
        """num_steps + 1 sigmas from 1 to 0, shifted for image_seq_len noisy tokens (sampling.get_schedule)."""
        return get_schedule(num_steps, image_seq_len, base_seq_len=self.base_image_seq_len,
                            max_seq_len=self.max_image_seq_len, base_shift=self.base_shift, max_shift=self.max_shift)


@dataclass(frozen=True)
class EditDefaults:
    """Per-model defaults of an edit, from an optional `slideredit.json` at the model folder's root
    (small models trained at a fixed size want their own; FLUX.1 Kontext [dev] uses these values)."""
    max_sequence_length: int = 512  # T5 tokens
    auto_resize: bool = True  # snap the context image to the nearest preferred Kontext resolution

    @classmethod
    def from_folder(cls, folder: Path) -> "EditDefaults":
        path = folder / "slideredit.json"
        if not path.is_file():
            return cls()
        config = json.loads(path.read_text())
        unknown = set(config) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**config)


def check_device(device: str | torch.device | None) -> torch.device:
    """The device to load onto, refused with a clear message when this torch cannot use it."""
    try:
        device = torch.device(device or "cpu")
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device ({err})") from None
    if device.type in ("cpu", "meta"):
        return device
    backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
    if backend is None or not backend.is_available():
        why = "was built without CUDA" if device.type == "cuda" and torch.version.cuda is None else \
            f"sees no {device.type} device"
        raise ValueError(f"device {str(device)!r} is not available: this torch ({torch.__version__}) {why}; "
                         "use device='cpu', or install the torch build for this machine's accelerator")
    count = getattr(backend, "device_count", lambda: 1)()
    if device.index is not None and device.index >= count:
        raise ValueError(f"device {str(device)!r} is not available: this machine has {count} {device.type} device(s)")
    return device


def check_lora_dropout(lora_dropout: float) -> None:
    """The release's loaders take lora_dropout; dropout is inactive at inference, so it is only checked."""
    if not is_number(lora_dropout) or not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout must be a number in [0, 1), got {lora_dropout!r} "
                         "(dropout is inactive at inference: the value has no effect on the edit)")


def check_instructions(texts: str | Sequence[str] | None, name: str) -> None:
    """An empty or blank prompt or sub-prompt is an error (it would edit with no instruction), named by index."""
    if texts is None:
        return
    for index, text in enumerate([texts] if isinstance(texts, str) else texts):
        if isinstance(text, str) and not text.strip():
            where = name if isinstance(texts, str) else f"{name}[{index}]"
            raise ValueError(f"{where} is {'empty' if not text else 'blank'} ({text!r}): give an edit instruction")


def model_folder(source: str | os.PathLike) -> Path:
    """The local folder of `source`: a hub repo id's snapshot (downloaded once, then cached), else the path.

    A hub id that is not cached is first probed once (hub.hub_problem, as eval.py does): an unreachable
    hub is one line at once, instead of the hub client's ~30 s of retries."""
    if not looks_like_repo_id(source):
        return Path(source).expanduser()
    problem = hub_problem(source, "FLUX.1 Kontext", filename="model_index.json")
    if problem is not None:
        raise CheckpointError(f"{problem}; connect to the network, or pass a local model folder")
    return download_from_hub(str(source), HUB_PATTERNS)


def check_finite(value: object, name: str) -> float:
    if not is_number(value) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def edit_batch(prompt: str | list[str] | None, prompt_embeds: Tensor | None, alphas: Sequence[object]
               ) -> tuple[int, int]:
    """-> (batch, rows): the prompts' rows, and the batch: the length of the per-image alpha lists among
    `alphas` (one prompt repeated), else the rows."""
    rows = prompt_embeds.shape[0] if prompt_embeds is not None else 1 if isinstance(prompt, str) else len(prompt)
    batch = alpha_batch(alphas) or rows
    if rows not in (1, batch):
        raise ValueError(f"{rows} prompts and per-image alpha lists of length {batch}: give one prompt, or one "
                         "prompt per alpha")
    return batch, rows


def batch_prompts(prompt: str | list[str] | None, batch: int, rows: int) -> list[str] | None:
    """Image i's prompt: one prompt repeated over the batch, or `rows` prompts repeated batch // rows times."""
    if prompt is None:
        return None
    return [prompt] * batch if isinstance(prompt, str) else list(prompt) * (batch // rows)


def output_size(context_w: int, context_h: int, width: int | None, height: int | None, max_area: float | None,
                auto_resize: bool) -> tuple[int, int]:
    """The edit's (width, height): as given, else the context's size (snapped to a preferred Kontext
    resolution with auto_resize); scaled to about max_area pixels when given; floored to 16."""
    if height is None:
        width, height = (context_w, context_h) if not auto_resize else default_output_size(context_w, context_h)
    if max_area is not None:
        width, height = area_scaled_size(width, height, max_area)
    width, height = width // 16 * 16, height // 16 * 16
    if width < 16 or height < 16:
        raise ValueError(f"output must be at least 16x16 pixels, got {width}x{height}")
    return width, height


def check_callback_tensors(returned: dict, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """What a step-end callback returned (sliders aside): tensors replacing those of `state`, same shapes."""
    for k, v in returned.items():
        if k not in state or not isinstance(v, Tensor) or v.shape != state[k].shape:
            raise ValueError(f"callback_on_step_end returned {k!r}: expected one of {sorted(state)} as a "
                             f"tensor of the same shape, or slider_alpha / slider_alpha_list")
    return returned


def use_true_cfg(true_cfg_scale: float, negative_prompt: object, negative_prompt_embeds: Tensor | None,
                 negative_pooled_prompt_embeds: Tensor | None) -> bool:
    """diffusers' rule: true CFG runs when true_cfg_scale > 1 and a negative prompt is given; half of
    that is a warning, a negative given twice or without its pooled vector an error."""
    has_negative = negative_prompt is not None or negative_prompt_embeds is not None
    if true_cfg_scale > 1 and not has_negative:
        warnings.warn("true_cfg_scale > 1 does nothing without negative_prompt or negative_prompt_embeds",
                      stacklevel=3)
    elif has_negative and true_cfg_scale <= 1:
        warnings.warn("the negative prompt is ignored: true CFG needs true_cfg_scale > 1", stacklevel=3)
    if not (has_negative and true_cfg_scale > 1):
        return False
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("give negative_prompt or negative_prompt_embeds, not both")
    if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
        raise ValueError("negative_prompt_embeds needs negative_pooled_prompt_embeds too")
    return True


OFFLOAD_DEVICE = torch.device("cpu")  # where offloaded components wait


def check_placement(offload: bool, model_offload: bool) -> None:
    if model_offload and not offload:
        raise ValueError("model_offload=True needs offload=True: the transformer leaves the device while the "
                         "offloaded text encoders visit it")


def placement_defaults(quantize: str | None, offload: bool | None = None, model_offload: bool | None = None,
                       tiled_decode: bool | None = None) -> tuple[bool, bool, bool]:
    """from_pretrained's (offload, model_offload, tiled_decode), each as given or by default. The
    low-memory mode (quantize="fp8") never holds two large components on the device: the text encoders
    stay on the CPU except while they encode, T5 in fp8 included (12.0 GB of fp8 transformer beside T5's
    5.9 GB would not fit 16 GB), and meanwhile the transformer waits on the CPU; images decode in strips.
    An explicit offload=False keeps the text encoders on the device, and the transformer with them."""
    low_memory = quantize == "fp8"
    offload = low_memory if offload is None else offload
    model_offload = (low_memory and offload) if model_offload is None else model_offload
    check_placement(offload, model_offload)
    return offload, model_offload, low_memory if tiled_decode is None else tiled_decode


class SliderEditFluxKontextPipeline:
    def __init__(self, transformer: Flux, autoencoder: AutoEncoder, text_encoders: KontextTextEncoders,
                 schedule: ScheduleConfig = ScheduleConfig(), defaults: EditDefaults = EditDefaults(), *,
                 offload: bool = False, model_offload: bool = False, tiled_decode: bool = False):
        check_placement(offload, model_offload)
        self.transformer, self.autoencoder, self.text_encoders = transformer, autoencoder, text_encoders
        self.schedule, self.defaults = schedule, defaults
        self.offload = offload  # keep the text encoders on the CPU except while they encode
        self.model_offload = model_offload  # and the transformer on the CPU while they do (_text_encoders_on)
        # Decode one image at a time in strips (AutoEncoder.decode_tiled, exact): at 1024^2 the untiled
        # decode's activations (1.61 GB bf16) outgrow the transformer's (1.44 GB, memory_plan), so in the
        # low-memory mode they would set the peak; in strips they are 0.24 GB.
        self.tiled_decode = tiled_decode
        self.progress = True

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, torch_dtype: torch.dtype = torch.bfloat16,
                        device: str | torch.device | None = None, *, offload: bool | None = None,
                        model_offload: bool | None = None, quantize: str | None = None,
                        t5_quantize: str | None = None, compile: bool = False,
                        tiled_decode: bool | None = None) -> "SliderEditFluxKontextPipeline":
        """Load a diffusers-layout Kontext folder (transformer/, vae/, text encoders, tokenizers) or a hub repo id.

        Low-memory mode, `quantize="fp8"`: the transformer's block linears hold float8_e4m3fn weights
        with one fp32 scale per output row, quantized while streaming (load_flux); sliders stay exact
        and unquantized on top of them. The device then never holds two large components: the text
        encoders stay on the CPU except while they encode (`offload`) and meanwhile the transformer
        waits on the CPU (`model_offload`); both default to True in this mode, False otherwise
        (placement_defaults; `pipe.memory_plan` gives the planned peak of each phase). `t5_quantize="fp8"`
        holds T5's linears in fp8 (5.9 GB instead of 9.5): on `device` beside the transformer without
        offload, else less to move. Images are decoded one at a time in strips (`tiled_decode` defaults
        to True in this mode: AutoEncoder.decode_tiled, the untiled image up to float rounding).
        `compile=True` calls `pipe.compile()` once loaded."""
        for name, value in (("quantize", quantize), ("t5_quantize", t5_quantize)):
            if value not in QUANTIZE_MODES:
                raise ValueError(f"{name} must be one of {QUANTIZE_MODES}, got {value!r}")
        offload, model_offload, tiled_decode = placement_defaults(quantize, offload, model_offload, tiled_decode)
        device = check_device(device)  # before any download or load
        folder = model_folder(source)
        if not folder.is_dir():
            raise CheckpointError(f"model folder not found: {folder} (and not a hub repo id of the form owner/name)")
        check_encoder_files(folder)  # a truncated T5 download fails now, not after the transformer loaded
        text_device = OFFLOAD_DEVICE if offload else device
        pipe = cls(load_flux(folder, dtype=torch_dtype, device=device, quantize=quantize),
                   load_autoencoder(folder, dtype=torch_dtype, device=device),
                   KontextTextEncoders.from_pretrained(folder, dtype=torch_dtype, device=text_device,
                                                       t5_quantize=t5_quantize),
                   ScheduleConfig.from_folder(folder), EditDefaults.from_folder(folder), offload=offload,
                   model_offload=model_offload, tiled_decode=tiled_decode)
        return pipe.compile() if compile else pipe

    @property
    def device(self) -> torch.device:
        """The device the pipeline computes on: the autoencoder's, which never leaves it (the transformer
        waits on the CPU while model_offload has the text encoders encode)."""
        return next(self.autoencoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def device_memory(self) -> dict[str, int]:
        """Bytes of parameters and buffers each component holds on the pipeline's device (offloaded text
        encoders hold 0 between encodes, as do absent ones: a pipeline built with text_encoders=None for
        prompt_embeds only); fp8 weights count one byte per element."""
        return {name: module_bytes(module, self.device) for name, module in components(self).items()}

    def memory_plan(self, height: int, width: int, batch: int = 1) -> MemoryPlan:
        """The planned device memory of an edit of `batch` images at height x width, per phase ("load",
        "text_encoding", "image_encoding", "denoising", "decoding"): `.peak` in bytes, `.resident` (as
        device_memory() will read in that phase) and `.working` (activations, estimated from their shapes).
        slideredit/memory_plan.py says what is counted; `memory_plan.plan_table` prints it."""
        return plan_edit(self, height, width, batch)

    def to(self, device: str | torch.device) -> "SliderEditFluxKontextPipeline":
        device = check_device(device)
        self.transformer.to(device)
        self.autoencoder.to(device)
        if not self.offload:
            self.text_encoders.to(device)
        return self

    def compile(self, **options) -> "SliderEditFluxKontextPipeline":
        """torch.compile the transformer's double and single blocks (slideredit/compile.py); changing
        alphas, sub-prompts or per-image alphas never recompiles them. `options` go to torch.compile."""
        compile_blocks(self.transformer, **options)
        return self

    def set_progress_bar_config(self, disable: bool = False) -> None:
        """diffusers' spelling for silencing the progress bar."""
        self.progress = not disable

    # --- sliders --------------------------------------------------------------------------------------

    def load_gstlora(self, path: str | os.PathLike, lora_rank: int | None = None, lora_dropout: float = 0.0) -> None:
        """Load a GSTLoRA checkpoint (`pytorch_lora_weights.safetensors` or a folder holding it);
        then `pipe(..., slider_alpha=a)` scales it on every token. `lora_rank`, when given, is checked
        against the file; `lora_dropout` (the release's argument, in [0, 1)) has no effect at inference."""
        check_lora_dropout(lora_dropout)
        load_adapter(self.transformer, GSTLORA, path, lora_rank)

    def load_stlora(self, path: str | os.PathLike, lora_rank: int | None = None, lora_dropout: float = 0.0) -> None:
        """Load an STLoRA checkpoint (`selective_lora.pt` / `.safetensors` or a folder holding it); then
        `pipe(..., prompt="A and B", subprompts_list=["A", "B"], slider_alpha_list=[a, b])`. The release's
        `pipe.load_stlora(path, lora_rank=16, lora_dropout=0.0)` works as it is (see load_gstlora)."""
        check_lora_dropout(lora_dropout)
        load_adapter(self.transformer, STLORA, path, lora_rank)

    def unload_sliders(self) -> None:
        """Remove every adapter: the transformer is exactly the base model again."""
        remove_adapters(self.transformer)

    def slider_schedule(self, prompts: list[str] | None, batch: int, num_steps: int, max_sequence_length: int,
                        slider_alpha: Alpha | None, subprompts_list: Sequence[str] | None,
                        slider_alpha_list: Sequence[Alpha] | None, slider_steps: object) -> SliderSchedule:
        """Check the sliders of one edit against the loaded adapters (before anything is computed)."""
        loaded = loaded_adapters(self.transformer)
        if slider_alpha is not None and GSTLORA not in loaded:
            raise ValueError("slider_alpha needs a GSTLoRA: call pipe.load_gstlora(path) first")
        spans = None
        if subprompts_list is not None or slider_alpha_list is not None:
            if STLORA not in loaded:
                raise ValueError("subprompts_list/slider_alpha_list need an STLoRA: call pipe.load_stlora(path) first")
            if subprompts_list is None or slider_alpha_list is None:
                raise ValueError("give subprompts_list and slider_alpha_list together")
            if prompts is None:
                raise ValueError("STLoRA finds the sub-prompts in the prompt's tokens: pass prompt= too")
            encoders = self.text_encoders
            spans_of = {p: subprompt_spans(p, subprompts_list, encoders.t5_token_ids, max_sequence_length,
                                           encoders.t5_tokenizer.convert_ids_to_tokens) for p in dict.fromkeys(prompts)}
            spans = [spans_of[p] for p in prompts]
        windows = check_windows(slider_steps, None if subprompts_list is None else len(subprompts_list),
                                slider_alpha is not None)
        return SliderSchedule(batch, num_steps, max_sequence_length, windows, slider_alpha, subprompts_list, spans,
                              slider_alpha_list)

    @torch.no_grad()
    def encode_prompt(self, prompt: str | list[str], max_sequence_length: int | None = None) -> tuple[Tensor, Tensor]:
        """-> (T5 embeddings (B, 512, 4096), CLIP pooled (B, 768)) on the pipeline's device and dtype."""
        max_sequence_length = max_sequence_length or self.defaults.max_sequence_length
        with self._text_encoders_on(self.device):
            embeds, pooled = self.text_encoders.encode(prompt, max_length=max_sequence_length)
        return embeds.to(self.device, self.dtype), pooled.to(self.device, self.dtype)

    @contextlib.contextmanager
    def _text_encoders_on(self, device: torch.device):
        """The text encoders on `device` while they encode, when offloaded; with model_offload the
        transformer leaves first and comes back after them, so the device never holds both.

        Why move the transformer rather than run T5 on the CPU (the low-memory mode's choice; cost model
        for FLUX.1 Kontext [dev], README "Low-memory mode"): each encode moves the 12.0 GB fp8 transformer
        off and back and T5 + CLIP (9.8 GB; 6.2 GB with t5_quantize="fp8") on and off: 43.5 GB (36.3 GB)
        over PCIe, about 3.6 s (3.0 s) at the 12 GB/s of a PCIe 4.0 x16 link from pageable memory, and
        T5's 4.9 TFLOP take well under 0.1 s on the GPU. On the CPU the same 4.9 TFLOP take 70 s on 2
        cores (measured, bf16) and about 10 s on a 16-core desktop. A sweep encodes once, so it pays one
        round trip either way."""
        if not self.offload:
            yield
            return
        if self.model_offload:
            self.transformer.to(OFFLOAD_DEVICE)
        try:
            self.text_encoders.to(device)
            yield
        finally:
            self.text_encoders.to(OFFLOAD_DEVICE)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # T5's blocks go back to the driver before the transformer returns
            if self.model_offload:
                self.transformer.to(device)

    @torch.no_grad()
    def encode_image(self, image: ImageInput, batch: int, auto_resize: bool = True) -> tuple[Tensor, int, int]:
        """Context image -> (packed latents (B, M, 64), width, height) at its snapped size."""
        pixels = prepare_context_image(image, auto_resize=auto_resize)
        height, width = pixels.shape[-2:]
        latents = self.autoencoder.encode(pixels.to(self.device, self.dtype))
        return pack_latents(latents).expand(batch, -1, -1), width, height

    @torch.no_grad()
    def __call__(self, image: ImageInput | None = None, prompt: str | list[str] | None = None, *,
                 num_inference_steps: int = 28, guidance_scale: float = 3.5, height: int | None = None,
                 width: int | None = None, generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: Tensor | None = None, output_type: str = "pil", prompt_embeds: Tensor | None = None,
                 pooled_prompt_embeds: Tensor | None = None, max_sequence_length: int | None = None,
                 auto_resize: bool | None = None, _auto_resize: bool | None = None, max_area: float | None = None,
                 slider_alpha: Alpha | None = None,
                 subprompts_list: Sequence[str] | None = None, slider_alpha_list: Sequence[Alpha] | None = None,
                 slider_steps: tuple[float, float] | Sequence[tuple[float, float]] | None = None,
                 negative_prompt: str | list[str] | None = None, negative_prompt_embeds: Tensor | None = None,
                 negative_pooled_prompt_embeds: Tensor | None = None, true_cfg_scale: float = 1.0,
                 callback_on_step_end: StepEndCallback | None = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
                 ) -> KontextOutput:
        """Edit `image` as `prompt` says. `guidance_scale` defaults to 3.5, as in diffusers'
        FluxKontextPipeline and the SliderEdit release (Black Forest Labs' CLI and infer.py use 2.5).

        Output size: explicit height/width, else the context image's aspect ratio at about one megapixel
        (diffusers: 1024x1024). `max_area`, as in diffusers, scales that size to about max_area pixels,
        keeping its aspect ratio (without it, explicit height/width are used as given, where diffusers
        scales them to its default 1024**2). `latents` (B, N, 64) packed replaces the initial noise.
        `auto_resize=False` (diffusers' spelling: `_auto_resize`) keeps the context image's own size
        (floored to 16) instead of the nearest preferred Kontext resolution. `max_sequence_length` and
        `auto_resize` default to the model folder's `slideredit.json` (512 T5 tokens and True for
        FLUX.1 Kontext [dev]).

        Sliders (after load_gstlora / load_stlora): `slider_alpha` scales the GSTLoRA on every token;
        `subprompts_list` + `slider_alpha_list` scale the STLoRA on each sub-prompt's T5 tokens. Alpha 0
        is the base edit, 1 suppresses the instruction, negative values exaggerate it. Sliders are
        trained for about [-1, 1] (the release validates on [-1.5, 1.5]); |alpha| > 10 warns, a
        non-finite alpha is an error.

        Batched alphas: `slider_alpha`, or any entry of `slider_alpha_list`, may be a list with one alpha
        per image. The batch is then that list's length L: one prompt is repeated L times, or a list
        of L prompts gets one alpha each. Every image shares the context latents, the prompt encoding
        and the noise (drawn once per prompt, as for an unbatched call with the same generator), so
        image i equals the unbatched call with alpha i, up to float rounding of batched GEMMs. A list
        of generators (one per image) or `latents` (B, N, 64) give each image its own noise.

        Schedules: `slider_steps=(start, end)` (fractions of the steps, default (0, 1)) limits the
        sliders to steps i with start <= i / num_inference_steps < end; a list of pairs gives one
        window per STLoRA sub-prompt. An alpha may also be a callable alpha(step_index, sigma).

        `callback_on_step_end(pipe, step_index, timestep, callback_kwargs)` runs after every step, as
        in diffusers (timestep = sigma x 1000); callback_kwargs holds the tensors named in
        `callback_on_step_end_tensor_inputs` (any of CALLBACK_TENSOR_INPUTS). The tensors of the dict
        it returns replace those; it may also return "slider_alpha" / "slider_alpha_list" to move the
        call's sliders from the next step on.

        True CFG (`true_cfg_scale` > 1 with `negative_prompt` or `negative_prompt_embeds` +
        `negative_pooled_prompt_embeds`, as diffusers): v = v_neg + true_cfg_scale (v - v_neg), two
        model passes per step. STLoRA's spans are tokens of the positive prompt, so the negative pass
        runs with the STLoRA off. A GSTLoRA acts on every token (image and context tokens included):
        it changes the model, not a prompt, so both passes use it at the same alpha; otherwise the
        guidance difference would carry the adapter's own effect, multiplied by true_cfg_scale."""
        # Check every argument before anything is computed.
        auto_resize, guidance_scale, true_cfg_scale = self._check_arguments(
            image=image, prompt=prompt, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            subprompts_list=subprompts_list, guidance_scale=guidance_scale, true_cfg_scale=true_cfg_scale,
            height=height, width=width, max_area=max_area, auto_resize=auto_resize, _auto_resize=_auto_resize,
            output_type=output_type, callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
        batch, rows = edit_batch(prompt, prompt_embeds, [slider_alpha, *(slider_alpha_list or [])])
        seq_len = prompt_embeds.shape[1] if prompt_embeds is not None else \
            (max_sequence_length or self.defaults.max_sequence_length)
        sliders = self.slider_schedule(batch_prompts(prompt, batch, rows), batch, num_inference_steps, seq_len,
                                       slider_alpha, subprompts_list, slider_alpha_list, slider_steps)
        true_cfg = use_true_cfg(true_cfg_scale, negative_prompt, negative_prompt_embeds, negative_pooled_prompt_embeds)
        # Prepare the Kontext inputs: the prompts' embeddings, the context image's tokens, the noise.
        txt, vec = self._prompt_rows(prompt, prompt_embeds, pooled_prompt_embeds, seq_len, batch)
        negative = self._negative_rows(negative_prompt, negative_prompt_embeds, negative_pooled_prompt_embeds,
                                       txt) if true_cfg else None
        inputs, width, height = self.prepare_kontext(image, txt, vec, width=width, height=height, max_area=max_area,
                                                     auto_resize=auto_resize, latents=latents, generator=generator,
                                                     noise_rows=rows)
        # Denoise and decode.
        latents = self._denoise(inputs, negative, sliders, num_inference_steps, guidance_scale, true_cfg_scale,
                                callback_on_step_end, callback_on_step_end_tensor_inputs)
        return self._decode(latents, width, height, output_type)

    # --- the steps of an edit -------------------------------------------------------------------------

    def _check_arguments(self, *, image: ImageInput | None, prompt: str | list[str] | None,
                         prompt_embeds: Tensor | None, pooled_prompt_embeds: Tensor | None,
                         subprompts_list: Sequence[str] | None, guidance_scale: float, true_cfg_scale: float,
                         height: int | None, width: int | None, max_area: float | None, auto_resize: bool | None,
                         _auto_resize: bool | None, output_type: str,
                         callback_on_step_end_tensor_inputs: Sequence[str]) -> tuple[bool, float, float]:
        """Refuse bad arguments before anything is computed. -> (auto_resize, guidance_scale, true_cfg_scale)
        with auto_resize from either spelling or the model folder's default, the scales as floats."""
        if _auto_resize is not None:  # diffusers' and the release's spelling
            if auto_resize is not None:
                raise ValueError("give auto_resize or _auto_resize (diffusers' spelling of the same switch), not both")
            auto_resize = _auto_resize
        if output_type not in ("pil", "pt"):
            raise ValueError(f"output_type must be 'pil' or 'pt', got {output_type!r}")
        guidance_scale = check_finite(guidance_scale, "guidance_scale")
        true_cfg_scale = check_finite(true_cfg_scale, "true_cfg_scale")
        if max_area is not None and check_finite(max_area, "max_area") <= 0:
            raise ValueError(f"max_area must be a positive number of pixels, got {max_area!r}")
        if image is None:
            raise ValueError("Kontext edits an image: pass image=")
        if prompt_embeds is None and prompt is None:
            raise ValueError("give a prompt, or prompt_embeds and pooled_prompt_embeds")
        check_instructions(prompt, "prompt")
        check_instructions(subprompts_list, "subprompts_list")
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("prompt_embeds needs pooled_prompt_embeds too (the CLIP pooled vector)")
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in CALLBACK_TENSOR_INPUTS]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs: {unknown} not among {list(CALLBACK_TENSOR_INPUTS)}")
        if (height is None) != (width is None):
            raise ValueError(f"give both height and width or neither; got height={height}, width={width}")
        return self.defaults.auto_resize if auto_resize is None else auto_resize, guidance_scale, true_cfg_scale

    def _prompt_rows(self, prompt: str | list[str] | None, embeds: Tensor | None, pooled: Tensor | None,
                     seq_len: int, batch: int, prefix: str = "") -> tuple[Tensor, Tensor]:
        """(T5 embeddings, CLIP pooled) of `prompt`, or the given ones, one row per image."""
        if embeds is None:
            embeds, pooled = self.encode_prompt(prompt, seq_len)
        return (self._rows(embeds, batch, f"{prefix}prompt_embeds"),
                self._rows(pooled, batch, f"{prefix}pooled_prompt_embeds"))

    def _negative_rows(self, prompt: str | list[str] | None, embeds: Tensor | None, pooled: Tensor | None,
                       txt: Tensor) -> tuple[Tensor, Tensor]:
        """True CFG's negative prompt, as _prompt_rows, in the shape of the positive prompt's embeddings `txt`."""
        negative = self._prompt_rows(prompt, embeds, pooled, txt.shape[1], txt.shape[0], "negative_")
        if negative[0].shape != txt.shape:
            raise ValueError(f"negative_prompt_embeds {tuple(negative[0].shape)} must have the shape of "
                             f"prompt_embeds {tuple(txt.shape)}")
        return negative

    @torch.no_grad()
    def prepare_kontext(self, image: ImageInput, txt: Tensor, vec: Tensor, *, width: int | None = None,
                        height: int | None = None, max_area: float | None = None, auto_resize: bool = True,
                        latents: Tensor | None = None, generator: torch.Generator | list[torch.Generator] | None = None,
                        noise_rows: int = 1) -> tuple[KontextInputs, int, int]:
        """The transformer's inputs for one edit (Black Forest Labs' prepare_kontext): the context image
        encoded and packed with position ids of first id 1, the output size (see __call__), the packed
        initial noise (drawn once per prompt row, `noise_rows`) or `latents`, with ids of first id 0, and
        the text ids of the prompt embeddings txt (B, T, d), vec (B, d). -> (inputs, width, height)."""
        batch = txt.shape[0]
        cond, context_w, context_h = self.encode_image(image, batch, auto_resize)
        width, height = output_size(context_w, context_h, width, height, max_area, auto_resize)
        img = self._initial_latents(latents, batch, noise_rows, width, height, generator)
        place = dict(device=self.device, dtype=self.dtype)
        inputs = KontextInputs(img=img, img_ids=latent_ids(batch, height // 16, width // 16, first_id=0, **place),
                               txt=txt, txt_ids=text_ids(batch, txt.shape[1], **place), vec=vec, cond=cond,
                               cond_ids=latent_ids(batch, context_h // 16, context_w // 16, first_id=1, **place))
        return inputs, width, height

    def _denoise(self, inputs: KontextInputs, negative: tuple[Tensor, Tensor] | None, sliders: SliderSchedule,
                 num_steps: int, guidance_scale: float, true_cfg_scale: float, callback: StepEndCallback | None,
                 callback_tensor_inputs: Sequence[str]) -> Tensor:
        """Euler steps from the initial noise to the edit's packed latents."""
        negative_inputs = None if negative is None else replace(inputs, txt=negative[0], vec=negative[1])
        velocity = self._velocity(inputs, negative_inputs, sliders, guidance_scale, true_cfg_scale)
        on_step_end = None if callback is None else \
            self._step_end(callback, callback_tensor_inputs, sliders, inputs, negative_inputs)
        return denoise(velocity, inputs.img, self.schedule.timesteps(num_steps, inputs.img.shape[1]),
                       progress=self.progress, on_step_end=on_step_end)

    def _velocity(self, inputs: KontextInputs, negative: KontextInputs | None, sliders: SliderSchedule,
                  guidance_scale: float, true_cfg_scale: float) -> Velocity:
        """velocity(x, t, i) of the edit: the sliders' scales for step i, then the model on the Kontext
        inputs; with true CFG also on the negative prompt, combined as v_neg + true_cfg_scale (v - v_neg)."""
        positive_velocity = kontext_velocity(self.transformer, inputs, guidance_scale)
        negative_velocity = None if negative is None else kontext_velocity(self.transformer, negative, guidance_scale)

        def velocity(x: Tensor, t: float, i: int) -> Tensor:
            self._set_sliders(sliders, i, t)
            v = positive_velocity(x, t, i)
            if negative_velocity is None:
                return v
            self._set_sliders(sliders, i, t, negative_pass=True)
            v_neg = negative_velocity(x, t, i)
            return v_neg + true_cfg_scale * (v - v_neg)

        return velocity

    def _set_sliders(self, sliders: SliderSchedule, step: int, sigma: float, negative_pass: bool = False) -> None:
        for name, scale in sliders.scales_to_set(step, sigma, negative_pass=negative_pass).items():
            set_slider_scale(self.transformer, name, scale)

    def _step_end(self, callback: StepEndCallback, tensor_inputs: Sequence[str], sliders: SliderSchedule,
                  inputs: KontextInputs, negative: KontextInputs | None) -> StepEnd:
        """denoise's step-end hook running diffusers' callback_on_step_end(pipe, step, timestep, kwargs):
        kwargs holds the tensors named in tensor_inputs, by diffusers' names; the tensors it returns replace
        them from the next step on, and "slider_alpha" / "slider_alpha_list" move the call's sliders."""
        prompts = {"": inputs} if negative is None else {"": inputs, "negative_": negative}

        def on_step_end(step: int, sigma: float, latents: Tensor) -> Tensor:
            state = {"latents": latents}
            for prefix, prompt in prompts.items():
                state[f"{prefix}prompt_embeds"], state[f"{prefix}pooled_prompt_embeds"] = prompt.txt, prompt.vec
            timestep = torch.tensor(sigma * 1000, dtype=torch.float32, device=self.device)
            out = dict(callback(self, step, timestep, {k: state[k] for k in tensor_inputs if k in state}) or {})
            sliders.update(out.pop("slider_alpha", None), out.pop("slider_alpha_list", None))
            state.update(check_callback_tensors(out, state))
            for prefix, prompt in prompts.items():  # the velocity reads the prompts at its next call
                prompt.txt, prompt.vec = state[f"{prefix}prompt_embeds"], state[f"{prefix}pooled_prompt_embeds"]
            return state["latents"]

        return on_step_end

    def _decode(self, latents: Tensor, width: int, height: int, output_type: str) -> KontextOutput:
        """Packed latents -> images: PIL, or (B, 3, H, W) in [0, 1] for output_type="pt"."""
        latents = unpack_latents(latents, height, width)
        if self.tiled_decode:
            pixels = torch.cat([self.autoencoder.decode_tiled(z[None]) for z in latents])
        else:
            pixels = self.autoencoder.decode(latents)
        pixels = (pixels.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return KontextOutput(images=pixels)
        arrays = (pixels.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
        return KontextOutput(images=[Image.fromarray(a) for a in arrays])

    def _rows(self, embeds: Tensor, batch: int, name: str) -> Tensor:
        """Embeddings on the pipeline's device and dtype, one row per image (a single row is repeated)."""
        if embeds.shape[0] not in (1, batch):
            raise ValueError(f"{name} has {embeds.shape[0]} rows for a batch of {batch} images")
        return embeds.to(self.device, self.dtype).expand(batch, *embeds.shape[1:])

    def _initial_latents(self, latents: Tensor | None, batch: int, rows: int, width: int, height: int,
                         generator: torch.Generator | list[torch.Generator] | None) -> Tensor:
        """The packed latents the flow starts from: `latents` (B or 1, N, 64), else drawn noise."""
        if latents is None:
            return self._noise(batch, rows, height, width, generator)
        shape = (batch, (height // 16) * (width // 16), 64)
        if latents.shape[1:] != shape[1:] or latents.shape[0] not in (1, batch):
            raise ValueError(f"latents must be packed (B, N, 64) = {shape} for a {width}x{height} output, "
                             f"got {tuple(latents.shape)}")
        return latents.to(self.device, self.dtype).expand(shape)

    def _noise(self, batch: int, rows: int, height: int, width: int,
               generator: torch.Generator | list[torch.Generator] | None) -> Tensor:
        """Packed initial noise: one draw per prompt row, repeated over an alpha batch; or one draw per
        generator when a list (one per image) is given."""
        draw = dict(device=self.device, dtype=self.dtype)
        if isinstance(generator, (list, tuple)):
            if len(generator) != batch:
                raise ValueError(f"{len(generator)} generators for a batch of {batch} images: give one per image")
            noise = torch.cat([initial_noise(1, height, width, generator=g, **draw) for g in generator])
        else:
            noise = initial_noise(rows, height, width, generator=generator, **draw)
        return pack_latents(noise).expand(batch, -1, -1)
