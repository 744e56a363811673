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
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from .autoencoder import AutoEncoder, load_autoencoder
from .checkpoint import CheckpointError, download_from_hub, looks_like_repo_id
from .image import ImageInput, default_output_size, prepare_context_image
from .slider_checkpoints import load_adapter
from .sliders import GSTLORA, STLORA, loaded_adapters, remove_adapters, set_slider_scale
from .token_selection import subprompt_token_scales
from .sampling import denoise, get_schedule, initial_noise, latent_ids, pack_latents, text_ids, unpack_latents
from .text_encoders import SUBFOLDERS, KontextTextEncoders
from .transformer import Flux
from .transformer_loading import load_flux

# What one edit needs from a diffusers-layout Kontext repository (BFL's single files are not fetched).
HUB_PATTERNS = ["model_index.json", "scheduler/*", "transformer/*", "vae/*"] + [f"{name}/*" for name in SUBFOLDERS]


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


class SliderEditFluxKontextPipeline:
    def __init__(self, transformer: Flux, autoencoder: AutoEncoder, text_encoders: KontextTextEncoders,
                 schedule: ScheduleConfig = ScheduleConfig(), defaults: EditDefaults = EditDefaults(), *,
                 offload: bool = False):
        self.transformer, self.autoencoder, self.text_encoders = transformer, autoencoder, text_encoders
        self.schedule, self.defaults = schedule, defaults
        self.offload = offload  # keep the text encoders on the CPU except while they encode
        self.progress = True

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, torch_dtype: torch.dtype = torch.bfloat16,
                        device: str | torch.device | None = None, *, offload: bool = False
                        ) -> "SliderEditFluxKontextPipeline":
        """Load a diffusers-layout Kontext folder (transformer/, vae/, text encoders, tokenizers) or a hub repo id."""
        folder = download_from_hub(str(source), HUB_PATTERNS) if looks_like_repo_id(source) else Path(source).expanduser()
        if not folder.is_dir():
            raise CheckpointError(f"model folder not found: {folder} (and not a hub repo id of the form owner/name)")
        device = torch.device(device or "cpu")
        text_device = "cpu" if offload else device
        return cls(load_flux(folder, dtype=torch_dtype, device=device),
                   load_autoencoder(folder, dtype=torch_dtype, device=device),
                   KontextTextEncoders.from_pretrained(folder, dtype=torch_dtype, device=text_device),
                   ScheduleConfig.from_folder(folder), EditDefaults.from_folder(folder), offload=offload)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def to(self, device: str | torch.device) -> "SliderEditFluxKontextPipeline":
        self.transformer.to(device)
        self.autoencoder.to(device)
        if not self.offload:
            self.text_encoders.to(device)
        return self

    def set_progress_bar_config(self, disable: bool = False) -> None:
        """diffusers' spelling for silencing the progress bar."""
        self.progress = not disable

    # --- sliders --------------------------------------------------------------------------------------

    def load_gstlora(self, path: str | os.PathLike, lora_rank: int | None = None) -> None:
        """Load a GSTLoRA checkpoint (`pytorch_lora_weights.safetensors` or a folder holding it);
        then `pipe(..., slider_alpha=a)` scales it on every token."""
        load_adapter(self.transformer, GSTLORA, path, lora_rank)

    def load_stlora(self, path: str | os.PathLike, lora_rank: int | None = None) -> None:
        """Load an STLoRA checkpoint (`selective_lora.pt` / `.safetensors` or a folder holding it); then
        `pipe(..., prompt="A and B", subprompts_list=["A", "B"], slider_alpha_list=[a, b])`."""
        load_adapter(self.transformer, STLORA, path, lora_rank)

    def unload_sliders(self) -> None:
        """Remove every adapter: the transformer is exactly the base model again."""
        remove_adapters(self.transformer)

    def set_sliders(self, prompts: list[str] | None, batch: int, slider_alpha: float | None,
                    subprompts_list: list[str] | None, slider_alpha_list: list[float] | None,
                    max_sequence_length: int) -> None:
        """Set every adapter's scale for the next edit; an adapter given no slider is switched off."""
        loaded = loaded_adapters(self.transformer)
        if slider_alpha is not None:
            if GSTLORA not in loaded:
                raise ValueError("slider_alpha needs a GSTLoRA: call pipe.load_gstlora(path) first")
            if not isinstance(slider_alpha, (int, float)) or not math.isfinite(slider_alpha):
                raise ValueError(f"slider_alpha must be a finite number, got {slider_alpha!r}")
        set_slider_scale(self.transformer, GSTLORA, slider_alpha)

        token_scales = None
        if subprompts_list is not None or slider_alpha_list is not None:
            if STLORA not in loaded:
                raise ValueError("subprompts_list/slider_alpha_list need an STLoRA: call pipe.load_stlora(path) first")
            if subprompts_list is None or slider_alpha_list is None:
                raise ValueError("give subprompts_list and slider_alpha_list together")
            if prompts is None:
                raise ValueError("STLoRA finds the sub-prompts in the prompt's tokens: pass prompt= too")
            encoders = self.text_encoders
            token_scales = torch.stack([
                subprompt_token_scales(p, subprompts_list, slider_alpha_list, encoders.t5_token_ids,
                                       max_sequence_length, encoders.t5_tokenizer.convert_ids_to_tokens)
                for p in prompts]).expand(batch, -1)
        set_slider_scale(self.transformer, STLORA, token_scales)

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
                 num_inference_steps: int = 28, guidance_scale: float = 2.5, height: int | None = None,
                 width: int | None = None, generator: torch.Generator | None = None, latents: Tensor | None = None,
                 output_type: str = "pil", prompt_embeds: Tensor | None = None,
                 pooled_prompt_embeds: Tensor | None = None, max_sequence_length: int | None = None,
                 auto_resize: bool | None = None, slider_alpha: float | None = None,
                 subprompts_list: list[str] | None = None, slider_alpha_list: list[float] | None = None,
                 ) -> KontextOutput:
        """Edit `image` as `prompt` says. Output size: explicit height/width, else the context image's
        aspect ratio at about one megapixel. `latents` (B, N, 64) packed replaces the initial noise.
        `auto_resize=False` keeps the context image's own size (floored to 16) instead of the nearest
        preferred Kontext resolution. `max_sequence_length` and `auto_resize` default to the model
        folder's `slideredit.json` (512 T5 tokens and True for FLUX.1 Kontext [dev]).

        Sliders (after load_gstlora / load_stlora): `slider_alpha` scales the GSTLoRA on every token;
        `subprompts_list` + `slider_alpha_list` scale the STLoRA on each sub-prompt's T5 tokens. Alpha 0
        is the base edit, 1 suppresses the instruction, negative values exaggerate it."""
        auto_resize = self.defaults.auto_resize if auto_resize is None else auto_resize
        if output_type not in ("pil", "pt"):
            raise ValueError(f"output_type must be 'pil' or 'pt', got {output_type!r}")
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("give a prompt, or prompt_embeds and pooled_prompt_embeds")
            prompt_embeds, pooled_prompt_embeds = self.encode_prompt(prompt, max_sequence_length)
        elif pooled_prompt_embeds is None:
            raise ValueError("prompt_embeds needs pooled_prompt_embeds too (the CLIP pooled vector)")
        txt, vec = prompt_embeds.to(self.device, self.dtype), pooled_prompt_embeds.to(self.device, self.dtype)
        batch = txt.shape[0]
        if image is None:
            raise ValueError("Kontext edits an image: pass image=")
        prompts = None if prompt is None else [prompt] * batch if isinstance(prompt, str) else list(prompt)
        self.set_sliders(prompts, batch, slider_alpha, subprompts_list, slider_alpha_list, txt.shape[1])

        cond, context_w, context_h = self.encode_image(image, batch, auto_resize)
        if (height is None) != (width is None):
            raise ValueError(f"give both height and width or neither; got height={height}, width={width}")
        if height is None:
            width, height = (context_w, context_h) if not auto_resize else default_output_size(context_w, context_h)
        width, height = width // 16 * 16, height // 16 * 16
        if width < 16 or height < 16:
            raise ValueError(f"output must be at least 16x16 pixels, got {width}x{height}")

        h_tokens, w_tokens = height // 16, width // 16
        if latents is None:
            latents = pack_latents(initial_noise(batch, height, width, generator=generator, device=self.device,
                                                 dtype=self.dtype))
        elif latents.shape != (batch, h_tokens * w_tokens, cond.shape[-1]):
            raise ValueError(f"latents must be packed (B, N, 64) = {(batch, h_tokens * w_tokens, cond.shape[-1])} "
                             f"for a {width}x{height} output, got {tuple(latents.shape)}")
        img = latents.to(self.device, self.dtype)
        img_ids = latent_ids(batch, h_tokens, w_tokens, first_id=0, device=self.device, dtype=self.dtype)
        cond_ids = latent_ids(batch, context_h // 16, context_w // 16, first_id=1, device=self.device, dtype=self.dtype)

        s = self.schedule
        timesteps = get_schedule(num_inference_steps, img.shape[1], base_seq_len=s.base_image_seq_len,
                                 max_seq_len=s.max_image_seq_len, base_shift=s.base_shift, max_shift=s.max_shift)
        img = denoise(self.transformer, img, img_ids, txt, text_ids(batch, txt.shape[1], self.device, self.dtype),
                      vec, timesteps, guidance_scale, cond=cond, cond_ids=cond_ids, progress=self.progress)

        pixels = self.autoencoder.decode(unpack_latents(img, height, width))
        pixels = (pixels.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return KontextOutput(images=pixels)
        arrays = (pixels.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
        return KontextOutput(images=[Image.fromarray(a) for a in arrays])
