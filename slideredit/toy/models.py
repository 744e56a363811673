"""The toy model family: FLUX.1 Kontext's architecture at a size a CPU trains in an hour.

Every piece is the project's own class at a small configuration, so the toy model runs through exactly
the code paths of the real one (load_flux, load_autoencoder, KontextTextEncoders, the pipeline, the
sliders):

    image 128x128 -> autoencoder (widths 64/32/64/64, 8x down) -> 16x16x16 latent -> 8x8 = 64 packed tokens
    Flux: hidden 128, 4 heads of 32 (RoPE axes 4/14/14, FLUX's split), 2 double + 2 single blocks
    T5 encoder: d_model 64, 3 layers; CLIP text model: hidden 32, 1 layer (pooled output only)
    tokenizers: a word-level unigram model fitted to the instruction corpus (T5), byte-level BPE with
    merges that spell the same words (CLIP)
    edits see 64 noisy + 64 context + 32 text tokens

`save_model_folder` writes the layout `SliderEditFluxKontextPipeline.from_pretrained` reads: the
transformer as a BFL single file, the autoencoder as BFL's `ae.safetensors`, the text encoders and
tokenizers in the diffusers subfolders, the schedule, and `slideredit.json` with the edit defaults.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from ..atomic import atomic_path
from ..autoencoder import AttnBlock, AutoEncoder, AutoEncoderParams, ResnetBlock
from ..text_encoders import KontextTextEncoders
from ..transformer import Flux, FluxParams
from ..transformer_loading import default_axes_dim
from .shapes import IMAGE_SIZE, instruction_corpus

MAX_SEQUENCE_LENGTH = 32  # T5 tokens per prompt: three joined edits take 15
GUIDANCE = 2.5  # what the toy's evaluations and infer.py pass (BFL's default); the toy model is trained to ignore it

# GroupNorm always has 32 groups. At 32 channels each group is a single channel: an instance norm, which
# erases a channel's amplitude -- the colour of a flat shape. The full-resolution level (where the
# decoder's last norm sits) and the lowest one (the encoder's last norm) therefore get 64 channels; the
# level between keeps 32, where the residual path carries the colours past the norms.
# The scale and shift stay FLUX's: BFL's ae.safetensors does not record them, so `load_autoencoder`
# applies FLUX's values to any ae.safetensors. The recipe trains the encoder to make the latent
# z = 0.3611 * (mean - 0.1159) zero-mean and unit-variance per channel instead.
AE_PARAMS = AutoEncoderParams(resolution=IMAGE_SIZE, ch=32, ch_mult=(2, 1, 2, 2), num_res_blocks=1, z_channels=16)
T5_CONFIG = dict(
    d_model=64, d_kv=16, d_ff=128, num_layers=3, num_heads=4, relative_attention_num_buckets=32,
    relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dropout_rate=0.0,
    layer_norm_epsilon=1e-6, is_encoder_decoder=False, use_cache=False,
)
CLIP_CONFIG = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    bos_token_id=0, pad_token_id=1, eos_token_id=2,  # as in the real config: EOS found by argmax of the ids
)
HEAD_DIM = 32
FLUX_PARAMS = FluxParams(
    in_channels=4 * AE_PARAMS.z_channels, out_channels=4 * AE_PARAMS.z_channels,
    vec_in_dim=CLIP_CONFIG["hidden_size"], context_in_dim=T5_CONFIG["d_model"],
    hidden_size=4 * HEAD_DIM, num_heads=4, depth=2, depth_single_blocks=2,
    axes_dim=default_axes_dim(HEAD_DIM),  # what load_flux infers from a BFL file's shapes
)
SCHEDULER_CONFIG = {  # the pipeline reads the schedule's shift from here (FLUX's values)
    "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
    "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
    "use_dynamic_shifting": True,
}
EDIT_DEFAULTS = {"max_sequence_length": MAX_SEQUENCE_LENGTH, "auto_resize": False}
TRANSFORMER_FILE = "flux1-toy.safetensors"
AE_FILE = "ae.safetensors"


# ---------------------------------------------------------------------------------------------------
# Tokenizers, trained on the instruction corpus
# ---------------------------------------------------------------------------------------------------

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def make_t5_tokenizer(corpus: list[str] | None = None) -> T5TokenizerFast:
    """A word-level unigram model fitted to the corpus: one piece "▁word" per corpus word, scored by its
    log frequency (what sentencepiece's word model computes, without its pruning of words seen once),
    plus "▁" and the 26 letters at a low score, so an unseen lowercase word is spelled out instead of
    becoming <unk>. Ids: <pad> 0, </s> 1, <unk> 2, as in T5."""
    counts = Counter(w for line in (corpus or instruction_corpus()) for w in line.split())
    total = sum(counts.values())
    words = sorted(counts, key=lambda w: (-counts[w], w))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, math.log(counts[w] / total)) for w in words]
    pieces += [(p, -20.0) for p in ["▁", *_LETTERS]]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def _byte_alphabet() -> list[str]:
    # GPT-2 / CLIP byte-level alphabet: printable bytes stand for themselves, the others are shifted past
    # 255 so every byte has a visible character.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def make_clip_tokenizer(corpus: list[str] | None = None) -> CLIPTokenizer:
    """Byte-level BPE whose merges spell every corpus word left to right ("s q" -> "sq", "sq u" -> "squ",
    ..., "squar e</w>" -> "square</w>"), so corpus words are one token each."""
    words = sorted({w for line in (corpus or instruction_corpus()) for w in line.split()})
    merges: list[tuple[str, str]] = []
    for word in words:
        prefix = word[0]
        for i, ch in enumerate(word[1:], start=1):
            right = ch + "</w>" if i == len(word) - 1 else ch
            if (prefix, right) not in merges:
                merges.append((prefix, right))
            prefix += right
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + list(dict.fromkeys(a + b for a, b in merges))
    tokens += ["<|startoftext|>", "<|endoftext|>"]  # last, so EOS has the highest id (as in real CLIP)
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, model_max_length=77)


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------

def build_text_encoders(seed: int = 0) -> KontextTextEncoders:
    """CLIP and T5 at the toy sizes, randomly initialised from `seed`, frozen. The recipe trains T5 with
    the transformer and keeps CLIP as it is (see recipe.py for why its pooled vector is ignored)."""
    t5_tokenizer = make_t5_tokenizer()
    clip_tokenizer = make_clip_tokenizer()
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tokenizer), **CLIP_CONFIG))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), **T5_CONFIG))
    return KontextTextEncoders(clip, clip_tokenizer, t5, t5_tokenizer).requires_grad_(False)


def build_autoencoder(seed: int = 0) -> AutoEncoder:
    """The toy autoencoder with every residual branch's last conv and the attention's output projection
    zero, so each block starts as the identity: the untrained autoencoder is a chain of convolutions
    and one GroupNorm per half, colours pass through it from the first step, and training refines it
    (starting from PyTorch's default initialisation, flat colours took thousands of steps to come through
    the normalisations)."""
    torch.manual_seed(seed)
    model = AutoEncoder(AE_PARAMS)
    for module in model.modules():
        last = module.conv2 if isinstance(module, ResnetBlock) else module.proj_out if isinstance(module, AttnBlock) else None
        if last is not None:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
    return model


def build_flux(seed: int = 0) -> Flux:
    """The toy transformer with DiT's initialisation: Xavier-uniform linear layers, zero biases, and
    every modulation and the output projection zero (adaLN-Zero), so each block starts as the identity
    and the model starts by predicting zero velocity."""
    torch.manual_seed(seed)
    model = Flux(FLUX_PARAMS)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    for embedder in (model.time_in, model.guidance_in):
        nn.init.normal_(embedder.in_layer.weight, std=0.02)
        nn.init.normal_(embedder.out_layer.weight, std=0.02)
    zero = [*(b.img_mod.lin for b in model.double_blocks), *(b.txt_mod.lin for b in model.double_blocks),
            *(b.modulation.lin for b in model.single_blocks), model.final_layer.adaLN_modulation[1],
            model.final_layer.linear]
    for linear in zero:
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
    return model


# ---------------------------------------------------------------------------------------------------
# The model folder
# ---------------------------------------------------------------------------------------------------

def _save_tensors(module: nn.Module, path: Path, dtype: torch.dtype) -> None:
    tensors = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
               for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def save_model_folder(out: str | Path, flux: Flux, autoencoder: AutoEncoder, text_encoders: KontextTextEncoders,
                      dtype: torch.dtype = torch.float32) -> Path:
    """Write a complete model folder that `SliderEditFluxKontextPipeline.from_pretrained(out)` loads:

        flux1-toy.safetensors   the transformer, BFL names (load_flux infers the sizes from the shapes)
        ae.safetensors          the autoencoder, BFL names
        text_encoder/ tokenizer/ text_encoder_2/ tokenizer_2/   CLIP, its tokenizer, T5, its tokenizer
        scheduler/scheduler_config.json, slideredit.json (max_sequence_length 32, auto_resize false)
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _save_tensors(flux, out / TRANSFORMER_FILE, dtype)
    _save_tensors(autoencoder, out / AE_FILE, dtype)
    text_encoders.clip.save_pretrained(out / "text_encoder")
    text_encoders.t5.save_pretrained(out / "text_encoder_2")
    for tokenizer, folder in ((text_encoders.clip_tokenizer, "tokenizer"), (text_encoders.t5_tokenizer, "tokenizer_2")):
        # A call with padding="max_length" leaves the fast tokenizer's backend padding and truncating, and
        # tokenizer.json would carry that last call's settings to every other reader of the file.
        tokenizer.backend_tokenizer.no_padding()
        tokenizer.backend_tokenizer.no_truncation()
        tokenizer.save_pretrained(out / folder)
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2) + "\n")
    (out / "slideredit.json").write_text(json.dumps(EDIT_DEFAULTS, indent=2) + "\n")
    return out
