"""SliderEditFluxKontextPipeline: instruction-based editing with FLUX.1 Kontext [dev].

One edit: encode the prompt (T5 per token, CLIP pooled), encode the context image with the
autoencoder and pack it into tokens with first position id 1, draw noise for the target, integrate
the rectified flow with Euler steps while the model sees [noisy ; context] tokens, then unpack and
decode. The import path `slideredit.pipelines` is the one the SliderEdit release's examples use.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from .autoencoder import AutoEncoder, load_autoencoder
from .checkpoint import CheckpointError, download_from_hub, looks_like_repo_id
from .compile import compile_blocks
from .image import ImageInput, area_scaled_size, default_output_size, prepare_context_image
from .slider_checkpoints import load_adapter
from .sliders import GSTLORA, STLORA, loaded_adapters, remove_adapters, set_slider_scale
from .slider_schedule import Alpha, SliderSchedule, alpha_batch, check_windows
from .token_selection import is_number, subprompt_spans
from .sampling import denoise, get_schedule, initial_noise, latent_ids, pack_latents, text_ids, unpack_latents
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

    A hub id that is not cached is first probed once (evaluation.loading.check_hub_source, as eval.py
    does): an unreachable hub is one line at once, instead of the hub client's ~30 s of retries."""
    if not looks_like_repo_id(source):
        return Path(source).expanduser()
    from .evaluation.loading import HubUnreachableError, check_hub_source

    try:
        check_hub_source(source, "FLUX.1 Kontext", filename="model_index.json")
    except HubUnreachableError as err:
        raise CheckpointError(f"{err}; connect to the network, or pass a local model folder") from None
    return download_from_hub(str(source), HUB_PATTERNS)


def check_finite(value: object, name: str) -> float:
    if not is_number(value) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


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


class SliderEditFluxKontextPipeline:
    def __init__(self, transformer: Flux, autoencoder: AutoEncoder, text_encoders: KontextTextEncoders,
                 schedule: ScheduleConfig = ScheduleConfig(), defaults: EditDefaults = EditDefaults(), *,
                 offload: bool = False, tiled_decode: bool = False):
        self.transformer, self.autoencoder, self.text_encoders = transformer, autoencoder, text_encoders
        self.schedule, self.defaults = schedule, defaults
        self.offload = offload  # keep the text encoders on the CPU except while they encode
        # Decode one image at a time in strips (AutoEncoder.decode_tiled, exact): at 1024^2 the untiled
        # decode's activations (1.50 GB bf16) outgrow the transformer's (about 1.2 GB), so in the
        # low-memory mode they would set the peak; in strips they are 0.13 GB.
        self.tiled_decode = tiled_decode
        self.progress = True

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, torch_dtype: torch.dtype = torch.bfloat16,
                        device: str | torch.device | None = None, *, offload: bool | None = None,
                        quantize: str | None = None, t5_quantize: str | None = None, compile: bool = False,
                        tiled_decode: bool | None = None) -> "SliderEditFluxKontextPipeline":
        """Load a diffusers-layout Kontext folder (transformer/, vae/, text encoders, tokenizers) or a hub repo id.

        Low-memory mode, `quantize="fp8"`: the transformer's block linears hold float8_e4m3fn weights
        with one fp32 scale per output row, quantized while streaming (load_flux); sliders stay exact
        and unquantized on top of them. The text encoders then stay on the CPU except while they
        encode (`offload` defaults to True in this mode, False otherwise), unless `t5_quantize="fp8"`
        holds T5's linears in fp8 too, small enough to stay on `device` (offload then defaults to False),
        and images are decoded one at a time in strips (`tiled_decode` defaults to True in this mode:
        AutoEncoder.decode_tiled, the untiled image up to float rounding).
        `compile=True` calls `pipe.compile()` once loaded."""
        for name, value in (("quantize", quantize), ("t5_quantize", t5_quantize)):
            if value not in QUANTIZE_MODES:
                raise ValueError(f"{name} must be one of {QUANTIZE_MODES}, got {value!r}")
        if offload is None:
            offload = quantize == "fp8" and t5_quantize is None
        if tiled_decode is None:
            tiled_decode = quantize == "fp8"
        device = check_device(device)  # before any download or load
        folder = model_folder(source)
        if not folder.is_dir():
            raise CheckpointError(f"model folder not found: {folder} (and not a hub repo id of the form owner/name)")
        check_encoder_files(folder)  # a truncated T5 download fails now, not after the transformer loaded
        text_device = "cpu" if offload else device
        pipe = cls(load_flux(folder, dtype=torch_dtype, device=device, quantize=quantize),
                   load_autoencoder(folder, dtype=torch_dtype, device=device),
                   KontextTextEncoders.from_pretrained(folder, dtype=torch_dtype, device=text_device,
                                                       t5_quantize=t5_quantize),
                   ScheduleConfig.from_folder(folder), EditDefaults.from_folder(folder), offload=offload,
                   tiled_decode=tiled_decode)
        return pipe.compile() if compile else pipe

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def device_memory(self) -> dict[str, int]:
        """Bytes of parameters and buffers each component holds on the pipeline's device (offloaded text
        encoders hold 0 between encodes, as do absent ones: a pipeline built with text_encoders=None for
        prompt_embeds only); fp8 weights count one byte per element."""
        return {name: 0 if module is None else
                sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()]
                    if t.device == self.device)
                for name, module in (("transformer", self.transformer), ("autoencoder", self.autoencoder),
                                     ("text_encoders", self.text_encoders))}

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
        if self.offload:
            self.text_encoders.to(self.device)
        try:
            embeds, pooled = self.text_encoders.encode(prompt, max_length=max_sequence_length)
        finally:
            if self.offload:
                self.text_encoders.to("cpu")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        return embeds.to(self.device, self.dtype), pooled.to(self.device, self.dtype)

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
        if _auto_resize is not None:  # diffusers' and the release's spelling
            if auto_resize is not None:
                raise ValueError("give auto_resize or _auto_resize (diffusers' spelling of the same switch), not both")
            auto_resize = _auto_resize
        auto_resize = self.defaults.auto_resize if auto_resize is None else auto_resize
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

        # The batch: the prompts' rows, or the length of the per-image alpha lists (one prompt repeated).
        rows = prompt_embeds.shape[0] if prompt_embeds is not None else 1 if isinstance(prompt, str) else len(prompt)
        batch = alpha_batch([slider_alpha, *(slider_alpha_list or [])]) or rows
        if rows not in (1, batch):
            raise ValueError(f"{rows} prompts and per-image alpha lists of length {batch}: give one prompt, or one "
                             "prompt per alpha")
        prompts = None if prompt is None else [prompt] * batch if isinstance(prompt, str) else list(prompt) * (batch // rows)
        seq_len = prompt_embeds.shape[1] if prompt_embeds is not None else \
            (max_sequence_length or self.defaults.max_sequence_length)
        sliders = self.slider_schedule(prompts, batch, num_inference_steps, seq_len, slider_alpha, subprompts_list,
                                       slider_alpha_list, slider_steps)

        true_cfg = use_true_cfg(true_cfg_scale, negative_prompt, negative_prompt_embeds, negative_pooled_prompt_embeds)

        if prompt_embeds is None:
            prompt_embeds, pooled_prompt_embeds = self.encode_prompt(prompt, max_sequence_length)
        txt = self._rows(prompt_embeds, batch, "prompt_embeds")
        vec = self._rows(pooled_prompt_embeds, batch, "pooled_prompt_embeds")
        negative = None
        if true_cfg:
            if negative_prompt is not None:
                negative_prompt_embeds, negative_pooled_prompt_embeds = self.encode_prompt(negative_prompt, seq_len)
            negative = (self._rows(negative_prompt_embeds, batch, "negative_prompt_embeds"),
                        self._rows(negative_pooled_prompt_embeds, batch, "negative_pooled_prompt_embeds"))
            if negative[0].shape != txt.shape:
                raise ValueError(f"negative_prompt_embeds {tuple(negative[0].shape)} must have the shape of "
                                 f"prompt_embeds {tuple(txt.shape)}")

        cond, context_w, context_h = self.encode_image(image, batch, auto_resize)
        if (height is None) != (width is None):
            raise ValueError(f"give both height and width or neither; got height={height}, width={width}")
        if height is None:
            width, height = (context_w, context_h) if not auto_resize else default_output_size(context_w, context_h)
        if max_area is not None:
            width, height = area_scaled_size(width, height, max_area)
        width, height = width // 16 * 16, height // 16 * 16
        if width < 16 or height < 16:
            raise ValueError(f"output must be at least 16x16 pixels, got {width}x{height}")

        h_tokens, w_tokens = height // 16, width // 16
        shape = (batch, h_tokens * w_tokens, cond.shape[-1])
        if latents is None:
            latents = self._noise(batch, rows, height, width, generator)
        elif latents.shape[1:] != shape[1:] or latents.shape[0] not in (1, batch):
            raise ValueError(f"latents must be packed (B, N, 64) = {shape} for a {width}x{height} output, "
                             f"got {tuple(latents.shape)}")
        img = latents.to(self.device, self.dtype).expand(shape)
        img_ids = latent_ids(batch, h_tokens, w_tokens, first_id=0, device=self.device, dtype=self.dtype)
        cond_ids = latent_ids(batch, context_h // 16, context_w // 16, first_id=1, device=self.device, dtype=self.dtype)

        s = self.schedule
        timesteps = get_schedule(num_inference_steps, img.shape[1], base_seq_len=s.base_image_seq_len,
                                 max_seq_len=s.max_image_seq_len, base_shift=s.base_shift, max_shift=s.max_shift)
        applied: dict[str, object] = {}

        def set_sliders(step: int, sigma: float, negative_branch: bool) -> None:
            gst, st = sliders.scales(step, sigma)
            for name, scale in ((GSTLORA, gst), (STLORA, None if negative_branch else st)):
                if name not in applied or applied[name] is not scale:  # only what changed
                    set_slider_scale(self.transformer, name, scale)
                    applied[name] = scale

        on_step_end = None
        if callback_on_step_end is not None:
            def on_step_end(step: int, sigma: float, state: dict[str, Tensor]) -> dict[str, Tensor]:
                kwargs = {k: state[k] for k in callback_on_step_end_tensor_inputs if k in state}
                timestep = torch.tensor(sigma * 1000, dtype=torch.float32, device=self.device)
                out = dict(callback_on_step_end(self, step, timestep, kwargs) or {})
                sliders.update(out.pop("slider_alpha", None), out.pop("slider_alpha_list", None))
                for k, v in out.items():
                    if k not in state or not isinstance(v, Tensor) or v.shape != state[k].shape:
                        raise ValueError(f"callback_on_step_end returned {k!r}: expected one of {sorted(state)} as a "
                                         f"tensor of the same shape, or slider_alpha / slider_alpha_list")
                return out

        img = denoise(self.transformer, img, img_ids, txt, text_ids(batch, txt.shape[1], self.device, self.dtype),
                      vec, timesteps, guidance_scale, cond=cond, cond_ids=cond_ids, progress=self.progress,
                      negative=negative, true_cfg_scale=true_cfg_scale, before_model=set_sliders,
                      on_step_end=on_step_end)

        latents = unpack_latents(img, height, width)
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
