"""Text conditioning for FLUX.1 Kontext: T5 v1.1 XXL (per-token) and CLIP ViT-L/14 (pooled).

Matches diffusers' FluxKontextPipeline.encode_prompt: T5 ids padded to max_length (512) with
truncation and encoded WITHOUT an attention mask (the transformer attends to the padding too);
CLIP ids padded/truncated to 77 and its `pooler_output` (B, 768) taken.

`t5_quantize="fp8"` holds T5's linears as float8_e4m3fn with one fp32 scale per output row
(slideredit/quantization.py): T5-XXL's 9.5 GB in bf16 become 5.9 GB, small enough to stay on a 24 GB GPU
beside the fp8 transformer. The feed-forward output `wo` keeps T5's dtype: transformers casts wo's input
to wo's weight dtype (T5DenseGatedActDense.forward), which for an fp8 weight would round the activations
to fp8 without a scale.
"""
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from .checkpoint import CheckpointError, download_from_hub, looks_like_repo_id
from .quantization import Fp8Linear

# diffusers-layout subfolders: CLIP is `text_encoder`, T5 is `text_encoder_2`.
SUBFOLDERS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
ENCODER_FOLDERS = ("text_encoder", "text_encoder_2")
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512
T5_QUANTIZE_MODES = (None, "fp8")


class KontextTextEncoders(nn.Module):
    """Frozen CLIP + T5 with their tokenizers. An nn.Module so `.to(device)` moves both (e.g. offload
    to the CPU after encoding)."""

    def __init__(
        self, clip: CLIPTextModel, clip_tokenizer: CLIPTokenizer, t5: T5EncoderModel, t5_tokenizer: T5TokenizerFast
    ):
        super().__init__()
        self.clip, self.t5 = clip.eval(), t5.eval()
        self.clip_tokenizer, self.t5_tokenizer = clip_tokenizer, t5_tokenizer

    @classmethod
    def from_pretrained(
        cls, source: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
        t5_quantize: str | None = None,
    ) -> "KontextTextEncoders":
        """Load from a diffusers-layout Kontext folder, or a hub repo id holding one.
        `t5_quantize="fp8"`: T5's linears (except `wo`) in fp8, quantized one by one on `device`."""
        if t5_quantize not in T5_QUANTIZE_MODES:
            raise ValueError(f"t5_quantize must be one of {T5_QUANTIZE_MODES}, got {t5_quantize!r}")
        if looks_like_repo_id(source):
            folder = download_from_hub(str(source), [f"{name}/*" for name in SUBFOLDERS])
        else:
            folder = Path(source).expanduser()
        if not folder.is_dir():
            raise CheckpointError(f"model folder not found: {folder} (and not a hub repo id of the form owner/name)")
        missing = [name + "/" for name in SUBFOLDERS if not (folder / name).is_dir()]
        if missing:
            raise CheckpointError(f"{folder} is not a diffusers-layout Kontext folder: missing {', '.join(missing)}")
        check_encoder_files(folder)
        encoders = cls(
            _load(CLIPTextModel, folder / "text_encoder", dtype=dtype),
            _load(CLIPTokenizer, folder / "tokenizer"),
            _load(T5EncoderModel, folder / "text_encoder_2", dtype=dtype),
            _load(T5TokenizerFast, folder / "tokenizer_2"),
        )
        if t5_quantize == "fp8":
            quantize_t5_linears(encoders.t5, device)
        return encoders.requires_grad_(False).to(device)

    @torch.no_grad()
    def encode(self, prompts: list[str] | str, max_length: int = T5_MAX_LENGTH) -> tuple[Tensor, Tensor]:
        """prompts -> (t5_embeds (B, max_length, d_t5), pooled (B, d_clip)), in the models' dtypes."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")
        if not 1 <= max_length <= T5_MAX_LENGTH:
            raise ValueError(f"max_length must be in 1..{T5_MAX_LENGTH}, got {max_length}")

        for prompt in prompts:
            dropped = len(self.t5_token_ids(prompt)) - max_length
            if dropped > 0:
                warnings.warn(
                    f"prompt truncated to {max_length} T5 tokens, {dropped} tokens dropped: {prompt[:60]!r}...",
                    stacklevel=2,
                )

        t5_ids = self._ids(self.t5_tokenizer, prompts, max_length, self.t5)
        t5_embeds = self.t5(t5_ids).last_hidden_state  # no attention mask, by design
        clip_ids = self._ids(self.clip_tokenizer, prompts, CLIP_MAX_LENGTH, self.clip)
        pooled = self.clip(clip_ids).pooler_output
        return t5_embeds.to(self.t5.dtype), pooled.to(self.clip.dtype)

    def t5_token_ids(self, prompt: str, add_eos: bool = True) -> list[int]:
        """T5 token ids of one prompt, unpadded and untruncated (EOS last when add_eos)."""
        return self.t5_tokenizer(prompt, add_special_tokens=add_eos).input_ids

    @staticmethod
    def _ids(tokenizer, prompts: list[str], max_length: int, model: nn.Module) -> Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        return ids.input_ids.to(model.device)


def t5_fp8_targets(t5: nn.Module) -> list[str]:
    """T5's linears that can hold fp8 weights: the attention projections and wi (wi_0, wi_1), not wo."""
    return [name for name, module in t5.named_modules()
            if isinstance(module, nn.Linear) and not name.endswith("DenseReluDense.wo")]


def quantize_t5_linears(t5: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """Replace T5's linears (t5_fp8_targets) by Fp8Linear in place, one at a time: each weight moves to
    `device` (default: where it is), is quantized there and its float copy dropped, so `device` never
    holds more than the quantized layers plus one float layer."""
    for name in t5_fp8_targets(t5):
        parent_name, _, child = name.rpartition(".")
        parent = t5.get_submodule(parent_name)
        linear = getattr(parent, child)
        if device is not None:
            linear.to(device)
        setattr(parent, child, Fp8Linear.from_linear(linear))
    return t5


def check_encoder_files(folder: Path) -> None:
    """Open every safetensors file of the two encoders: a truncated or corrupt download is one
    CheckpointError naming the file (safetensors checks that the header covers the file exactly),
    found before anything is loaded. Reads headers only."""
    for name in ENCODER_FOLDERS:
        for path in sorted((Path(folder) / name).glob("*.safetensors")):
            try:
                with safe_open(str(path), framework="pt"):
                    pass
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt download? "
                                      f"delete it and download it again): {err}") from None


def _load(cls, folder: Path, **kwargs):
    """transformers' from_pretrained, its file errors reported as one CheckpointError naming the folder."""
    try:
        return cls.from_pretrained(folder, **kwargs)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{folder}: cannot load this {cls.__name__} ({type(err).__name__}: {err})") from None
