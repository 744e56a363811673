"""Offline builders for a complete tiny FLUX.1 Kontext model folder (diffusers layout), for tests.

`build_tiny_kontext_folder(root)` writes everything FluxKontextPipeline.from_pretrained needs, with
every parameter randomised from a fixed seed (a fresh diffusers Flux has zero-initialised pieces that
would hide layout mistakes). The config constants below let other tests build matching models.
diffusers and transformers are used here only as test oracles.
"""
import io
import json
import math
from pathlib import Path

import sentencepiece as spm
import torch
from torch import nn

CLIP_CONFIG = dict(  # CLIPTextConfig; pooled dim = hidden size (feeds the transformer's vector_in)
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    bos_token_id=0, pad_token_id=1, eos_token_id=2,  # as in the real config: EOS found by argmax of the ids
)
T5_CONFIG = dict(  # T5Config for T5EncoderModel (vocab_size is set from the trained tokenizer)
    d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=32,
    relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dropout_rate=0.0,
    layer_norm_epsilon=1e-6, is_encoder_decoder=False, use_cache=False,
)
TRANSFORMER_CONFIG = dict(  # FluxTransformer2DModel; hidden = 2 heads x 16 = 32, RoPE axes sum to 16
    patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=T5_CONFIG["d_model"],
    pooled_projection_dim=CLIP_CONFIG["hidden_size"], guidance_embeds=True, axes_dims_rope=(4, 6, 6),
)
VAE_CONFIG = dict(  # AutoencoderKL shaped like FLUX's VAE, four levels of 32 channels
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 32, 32), layers_per_block=2,
    act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611,
    shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
)
SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
    "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
    "use_dynamic_shifting": True,
}
MODEL_INDEX = {
    "_class_name": "FluxKontextPipeline",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
# A few BPE merges so the CLIP tokenizer does more than split bytes.
CLIP_MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("h", "a"), ("ha", "ir</w>"), ("i", "r</w>")]
CORPUS = [
    "make the hair curly and add a red hat",
    "turn the sky into a sunset with orange clouds",
    "remove the glasses and make the person smile",
    "change the color of the car to bright blue",
    "add snow on the ground and make it winter",
    "make the cat look older with grey fur",
    "replace the background with a sandy beach",
    "give the man a thick beard and short hair",
    "make the woman look younger and happier",
    "add a small wooden boat on the calm lake",
    "keep the image the same",
    "the quick brown fox jumps over the lazy dog",
    "paint the house white and the door green",
    "put sunglasses on the child and add freckles",
    "make the lighting warmer, like golden hour",
    "Convert the photo to a watercolor painting!",
    "Zoom out slightly; show more of the street.",
    "increase the size of the eyes by 20 percent",
]


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrite every parameter with seeded noise: matrices ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2),
    1-D scales (norm weights) ~ 1 + N(0, 0.1^2). Deterministic in the parameter order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim >= 2:
                noise /= math.sqrt(p[0].numel())
            elif name.endswith("bias"):
                noise *= 0.1
            else:
                noise = 1 + 0.1 * noise
            p.copy_(noise)
    return module


def _bytes_to_unicode() -> list[str]:
    # GPT-2 / CLIP byte-level BPE alphabet: printable bytes stand for themselves, the rest are shifted
    # past 255 so every byte has a visible character.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def make_clip_tokenizer():
    from transformers import CLIPTokenizer

    alphabet = _bytes_to_unicode()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in CLIP_MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]  # last, so EOS has the highest id (as in real CLIP)
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=CLIP_MERGES, model_max_length=77)


def make_t5_tokenizer(vocab_size: int = 200):
    """T5 tokenizer from a unigram sentencepiece model trained in memory; returns (tokenizer, spiece bytes)."""
    from transformers import T5TokenizerFast

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, character_coverage=1.0,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)
    return tokenizer, model.getvalue()


def build_tiny_kontext_folder(root: Path, *, seed: int = 0, shard: bool = True,
                              transformer_config: dict | None = None) -> Path:
    """Write a complete tiny Kontext folder under root (created) and return root.
    `transformer_config` overrides entries of TRANSFORMER_CONFIG (benchmarks use a wider model)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))

    clip_tokenizer = make_clip_tokenizer()
    clip_tokenizer.save_pretrained(root / "tokenizer")
    # The real folder carries the BPE files too; from_pretrained reads either.
    (root / "tokenizer" / "vocab.json").write_text(json.dumps(clip_tokenizer.get_vocab()))
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in CLIP_MERGES)
    (root / "tokenizer" / "merges.txt").write_text(merges)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tokenizer), **CLIP_CONFIG))
    randomize_(clip, seed).save_pretrained(root / "text_encoder")

    t5_tokenizer, spiece = make_t5_tokenizer()
    t5_tokenizer.save_pretrained(root / "tokenizer_2")
    (root / "tokenizer_2" / "spiece.model").write_bytes(spiece)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), **T5_CONFIG))
    randomize_(t5, seed + 1).save_pretrained(root / "text_encoder_2")

    transformer = randomize_(FluxTransformer2DModel(**{**TRANSFORMER_CONFIG, **(transformer_config or {})}), seed + 2)
    transformer.save_pretrained(root / "transformer", max_shard_size="200KB" if shard else "10GB")
    randomize_(AutoencoderKL(**VAE_CONFIG), seed + 3).save_pretrained(root / "vae")
    return root
