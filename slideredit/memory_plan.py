"""The device-memory plan of one edit: the planned peak of each phase, in bytes, from the tensors' sizes.

An edit goes through five phases: `load` (from_pretrained), `text_encoding` (encode_prompt),
`image_encoding` (the context image through the autoencoder's encoder), `denoising` (the transformer,
once per step) and `decoding` (the autoencoder's decoder). A phase's planned peak is
- resident: the parameters and buffers of the components on the device in that phase (`on_device`, the
  pipeline's offload policy; fp8 weights count one byte per element), plus
- working: the activations alive at once at the phase's fullest moment, counted tensor by tensor from the
  shapes of the code that runs; each `*_bytes` function below names that moment and the tensors alive then.

The estimates assume a GPU's fused attention (flash or memory-efficient SDPA: no score matrix) and count
what `torch.cuda.max_memory_allocated` counts; the CUDA context, the caching allocator's slack and
cuBLAS / cuDNN workspaces (tens of MB) come on top. `full_size_pipeline` builds FLUX.1 Kontext [dev] at
its real sizes on the meta device, so the real model's plan needs neither its weights nor a GPU.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .autoencoder import AutoEncoder, AutoEncoderParams
from .quantization import FP8, QUANTIZE_CHUNK_ELEMENTS, Fp8Linear, swap_in_fp8
from .sliders import slider_layers
from .transformer import Flux, FluxParams

if TYPE_CHECKING:
    from .pipelines import SliderEditFluxKontextPipeline

PHASES = ("load", "text_encoding", "image_encoding", "denoising", "decoding")
COMPONENTS = ("transformer", "autoencoder", "text_encoders")
# The text encoders of FLUX.1 Kontext [dev] (its diffusers folder's text_encoder_2 and text_encoder):
# T5 v1.1 XXL's encoder (4,762,310,656 parameters, 9.52 GB in bf16) and CLIP ViT-L/14's text model
# (123,060,480 parameters).
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, vocab_size=32128,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
              is_encoder_decoder=False, use_cache=False)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu", bos_token_id=0, pad_token_id=1,
              eos_token_id=2)


@dataclass(frozen=True)
class PhasePlan:
    resident: dict[str, int]  # component -> bytes of its parameters and buffers on the device
    working: dict[str, int]  # what the phase computes with -> bytes alive at its fullest moment

    @property
    def peak(self) -> int:
        return sum(self.resident.values()) + sum(self.working.values())


MemoryPlan = dict[str, PhasePlan]  # phase -> its plan, in PHASES order


def module_bytes(module: nn.Module | None, device: torch.device | None = None) -> int:
    """Bytes of a module's parameters and buffers (fp8 weights: one per element), only those on `device`
    when given; 0 for an absent module."""
    if module is None:
        return 0
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()]
               if device is None or t.device == device)


def components(pipe: SliderEditFluxKontextPipeline) -> dict[str, nn.Module | None]:
    return {name: getattr(pipe, name) for name in COMPONENTS}


def on_device(phase: str, offload: bool, model_offload: bool) -> tuple[str, ...]:
    """The components the pipeline keeps on its device during `phase`. offload: the text encoders visit
    the device only to encode; model_offload: the transformer waits on the CPU meanwhile. The
    autoencoder (0.17 GB in bf16) never leaves."""
    if phase == "text_encoding":
        return tuple(c for c in COMPONENTS if not (model_offload and c == "transformer"))
    return tuple(c for c in COMPONENTS if not (offload and c == "text_encoders"))


def plan_edit(pipe: SliderEditFluxKontextPipeline, height: int, width: int, batch: int = 1) -> MemoryPlan:
    """The planned peak of each phase of an edit of `batch` images at height x width, with a context image
    of the same size (Kontext snaps both to the same preferred resolution) and the pipeline's T5 length."""
    if height % 16 or width % 16 or height < 16 or width < 16 or batch < 1:
        raise ValueError(f"memory_plan: height and width must be positive multiples of 16 and batch >= 1, "
                         f"got height={height}, width={width}, batch={batch}")
    model, autoencoder, text_encoders = pipe.transformer, pipe.autoencoder, pipe.text_encoders
    e = pipe.dtype.itemsize  # bytes per activation element
    text_tokens, image_tokens = pipe.defaults.max_sequence_length, 2 * (height // 16) * (width // 16)
    p = model.params
    prompts = batch * (text_tokens * p.context_in_dim + p.vec_in_dim) * e  # T5 per token, CLIP pooled
    latents = 4 * batch * image_tokens * p.in_channels * e  # noisy, context, the model's input, the velocity
    stacks = slider_stack_bytes(model, batch * (text_tokens + image_tokens), e)
    cached = {"slider stacks (cached by an edit)": stacks} if stacks else {}
    block_moment, block = transformer_block_bytes(model, text_tokens, image_tokens, batch, e)
    decoder = ("VAE decoder in strips", strip_decode_bytes(autoencoder.params, height, width, e)) if pipe.tiled_decode \
        else ("VAE decoder, whole batch", batch * decode_bytes(autoencoder.params, height, width, e))
    working = {
        "load": load_bytes(pipe),
        "text_encoding": {"prompt embeddings": prompts, **cached,
                          **({} if text_encoders is None else
                             {"T5 layer": t5_layer_bytes(text_encoders.t5, text_tokens, batch, e)})},
        "image_encoding": {"prompt embeddings": prompts, **cached,
                           "VAE encoder, one context image": encode_bytes(autoencoder.params, height, width, e)},
        "denoising": {"prompt embeddings": prompts, "latents": latents, **cached,
                      f"transformer: {block_moment}": block},
        "decoding": {"prompt embeddings": prompts, "latents": latents, **cached, decoder[0]: decoder[1],
                     "images": batch * 3 * height * width * (e + 8)},  # decoded, then in fp32 for [0, 1]
    }
    parts = components(pipe)
    return {phase: PhasePlan({name: module_bytes(module) if name in on_device(phase, pipe.offload, pipe.model_offload)
                              else 0 for name, module in parts.items()}, working[phase]) for phase in PHASES}


# ---------------------------------------------------------------------------------------------------
# What each phase computes with
# ---------------------------------------------------------------------------------------------------

def fp8_dequantized_bytes(weight: torch.Tensor) -> int:
    """The PyTorch fp8 path (kernels/masked_lora.py) dequantizes a weight per call: its fp32 copy and
    the fp32 product with the row scales, alive together (8 bytes per element). It runs on cards without
    the fused fp8 kernel, and on every card at the dispatch's first measurement of a shape."""
    return 8 * weight.numel() if weight.dtype == FP8 else 0


def load_bytes(pipe: SliderEditFluxKontextPipeline) -> dict[str, int]:
    """Loading streams each stored tensor straight into its final place on the device (no second copy);
    what quantizes to fp8 on the device (the transformer with quantize="fp8", T5 with t5_quantize="fp8"
    when it loads on the device) does so one chunk of rows at a time: the fp32 rows, their fp32 quotient
    by the scales and the fp8 result; T5's linears move to the device one at a time in float first."""
    working = {}
    t5 = None if pipe.text_encoders is None or pipe.offload else pipe.text_encoders.t5
    t5_fp8 = [m for m in ([] if t5 is None else t5.modules()) if isinstance(m, Fp8Linear)]
    if t5_fp8:
        working["T5 linear before quantization"] = max(m.weight.numel() for m in t5_fp8) * pipe.dtype.itemsize
    if t5_fp8 or any(isinstance(m, Fp8Linear) for m in pipe.transformer.modules()):
        working["fp8 quantization of one chunk of rows"] = QUANTIZE_CHUNK_ELEMENTS * (4 + 4 + 1)
    return working


def t5_layer_bytes(t5: nn.Module, tokens: int, batch: int, e: int) -> int:
    """T5 (transformers' T5 with SDPA: no score matrix on a GPU), an upper bound: the relative position
    bias (1, heads, T, T) every layer reuses and the six int64 (T, T) tensors that bucket the positions
    for it, the hidden states (the residual, T5LayerNorm's fp32 product, the normed input), then the
    larger of the gated feed-forward's three (B, T, d_ff) tensors (GELU(wi_0 x), wi_1 x, their product)
    and attention's q, k, v and output; with fp8 linears, the largest one dequantized by the PyTorch path."""
    c = t5.config
    bias = c.num_heads * tokens**2 * e + 6 * tokens**2 * 8
    hidden = batch * tokens * c.d_model * (e + 4 + e)
    feed_forward = 3 * batch * tokens * c.d_ff * e
    attention = 4 * batch * tokens * c.num_heads * c.d_kv * e
    dequantized = max((fp8_dequantized_bytes(m.weight) for m in t5.modules() if isinstance(m, Fp8Linear)), default=0)
    return bias + hidden + max(feed_forward, attention) + dequantized


def transformer_block_bytes(model: Flux, text_tokens: int, image_tokens: int, batch: int, e: int) -> tuple[str, int]:
    """-> (moment, bytes): the fullest moment inside a block of `model` (transformer_block_moments)."""
    moments = transformer_block_moments(model.params, text_tokens, image_tokens, batch, e,
                                        model.single_blocks[0].linear1.weight)
    moment = max(moments, key=moments.get)
    return moment, moments[moment]


def transformer_block_moments(p: FluxParams, text_tokens: int, image_tokens: int, batch: int, e: int,
                              linear1: torch.Tensor | None = None) -> dict[str, int]:
    """Bytes alive at the fullest moments inside the blocks of slideredit/transformer.py (a tensor lives
    until its name goes out of scope). In units of one (B, tokens, width) activation, with S = T + L
    tokens, D hidden, M MLP hidden; each moment also holds the model's RoPE table:
    - double block, RoPE of k: the block's inputs img and txt (held by Flux.forward), both streams' fused
      qkv outputs and normed q, k, the concatenated q, k, v and the rotated q: 10 S D, plus apply_rope's
      fp32 temporaries of k (its fp32 copy and four half-size products: 12 bytes per element);
    - double block, joint attention: the above without the temporaries, the rotated k, the attention
      output and its merged heads: 13 S D;
    - double block, image MLP: the above up to the attention output, the new img and its modulated input
      (L D each), the MLP's hidden layer and its GELU (L M each);
    - single block, linear1: the double blocks' last img and txt (held by Flux.forward), the block's input,
      its modulated input and the linear1 output S (3D + M); with fp8 weights (`linear1`, the largest)
      the PyTorch path's dequantized linear1 and, at the dispatch's first measurement, the other path's
      output beside it;
    - single block, RoPE of k: the above less the modulated input, plus the normed q and k, the rotated q
      and apply_rope's fp32 temporaries of k;
    - single block, linear2's input: the above less the modulated input, plus the normed q and k, the
      attention output, GELU(mlp) and their concatenation S (D + M): S (9D + 3M)."""
    D, M, T, L = p.hidden_size, p.mlp_hidden_dim, text_tokens, image_tokens
    S = T + L
    row = batch * e  # bytes of one token's channel in a (B, tokens, width) activation
    rope = batch * S * p.head_dim * 4  # cos and sin, (B, 1, S, head_dim / 2) fp32 each
    fp8 = 0 if linear1 is None or linear1.dtype != FP8 else fp8_dequantized_bytes(linear1) + row * S * (3 * D + M)
    rope_k = 12 * batch * S * D  # apply_rope's fp32 temporaries of k
    moments = {
        "double block, RoPE of k": row * S * 10 * D + rope_k,
        "double block, joint attention": row * S * 13 * D,
        "double block, image MLP": row * (7 * S * D + 2 * L * D + 2 * L * M),
        "single block, linear1" + (" (fp8: PyTorch path's dequantized weight)" if fp8 else ""):
            row * S * (3 * D + 3 * D + M) + fp8,
        "single block, RoPE of k": row * S * (8 * D + M) + rope_k,
        "single block, linear2's input": row * S * (9 * D + 3 * M),
    }
    return {moment: size + rope for moment, size in moments.items()}


def slider_stack_bytes(model: Flux, tokens: int, e: int) -> int:
    """Adapted layers keep their stacked adapters on the device between calls (sliders.AdapterStack): A
    and B zero-padded to the largest rank, in the activations' dtype, and the token scales (tokens, K)
    fp32; `tokens` bounds every layer's (the joint sequence of the batch)."""
    total = 0
    for _, layer in slider_layers(model):
        adapters = list(layer.adapters.values())
        if adapters:
            rank = max(a.rank for a in adapters)
            total += len(adapters) * (rank * (layer.in_features + layer.out_features) * e + tokens * 4)
    return total


def encode_bytes(params: AutoEncoderParams, height: int, width: int, e: int) -> int:
    """The encoder on one context image (encode_image encodes it once for the whole batch). The fullest
    moment of a level is its second ResnetBlock's second conv: the level's input (held by Encoder.forward),
    the block's input, conv1's output, the swish and conv2's output: (c_in + 4 c) per pixel; the largest
    level's, plus the image."""
    widths = [params.ch * m for m in params.ch_mult]
    level_inputs = [params.ch] + widths[:-1]
    moments = [(height >> i) * (width >> i) * (c_in + 4 * c) for i, (c_in, c) in enumerate(zip(level_inputs, widths))]
    return (max(moments) + params.in_channels * height * width) * e


def mid_attention_bytes(params: AutoEncoderParams, height: int, width: int, e: int) -> int:
    """The decoder's mid block at the latent resolution, at its attention's residual add: the input, its
    norm, q, k, v, the projected output, its reshaped copy and the sum (8 tensors of c_mid channels)."""
    downscale = 2 ** (len(params.ch_mult) - 1)
    return 8 * params.ch * params.ch_mult[-1] * (height // downscale) * (width // downscale) * e


def decode_bytes(params: AutoEncoderParams, height: int, width: int, e: int) -> int:
    """The whole decoder on one image (AutoEncoder.decode): a level's fullest moment is a ResnetBlock's
    second conv after the first block, (c_in + 4 c) per pixel as in `encode_bytes`, with c_in the level's
    input width (the next deeper level's); levels run deepest first, level i at 1 / 2^i of the size."""
    widths = [params.ch * m for m in params.ch_mult]
    level_inputs = widths[1:] + widths[-1:]
    moments = [(height >> i) * (width >> i) * (c_in + 4 * c) for i, (c_in, c) in enumerate(zip(level_inputs, widths))]
    return max(max(moments) * e, mid_attention_bytes(params, height, width, e))


STRIP_ROWS = inspect.signature(AutoEncoder.decode_tiled).parameters["rows"].default


def strip_decode_bytes(params: AutoEncoderParams, height: int, width: int, e: int, rows: int = STRIP_ROWS) -> int:
    """AutoEncoder.decode_tiled on one image (the pipeline decodes one at a time in this mode): the mid
    block runs whole (`mid_attention_bytes`); the up path runs op by op over strips of rows x scale latent
    rows (+ a halo row above and below) at its level's scale, the whole activations on the host between
    ops. GroupMoments.normalize holds up to three fp32 copies of the strip it normalizes (12 bytes per
    element). Per strip position, the first op of a level's first ResnetBlock holds the block input's
    strip (c_in channels) and normalize's copies of it; the second op the strips of h (c) and of the
    block input, nin_shortcut's output (c) and normalize's copies of h. (Later blocks have c_in = c, the
    upsample and the last op hold less.)"""
    widths = [params.ch * m for m in params.ch_mult]
    level_inputs = widths[1:] + widths[-1:]
    levels = len(widths)
    downscale = 2 ** (levels - 1)
    strips = []
    for i, (c_in, c) in enumerate(zip(level_inputs, widths)):
        scale = 2 ** (levels - 1 - i)  # pixels per latent row at level i
        positions = (rows * scale + 2) * (width // downscale * scale)
        first_op, second_op = (e + 12) * c_in, e * (c_in + 2 * c) + 12 * c
        strips.append(positions * max(first_op, second_op))
    return max(max(strips), mid_attention_bytes(params, height, width, e))


# ---------------------------------------------------------------------------------------------------
# The real model, without its weights
# ---------------------------------------------------------------------------------------------------

def full_size_pipeline(quantize: str | None = "fp8", t5_quantize: str | None = None,
                       dtype: torch.dtype = torch.bfloat16, **placement: bool | None) -> SliderEditFluxKontextPipeline:
    """FLUX.1 Kontext [dev] at its real sizes on the meta device (no weights, no memory): the transformer
    as load_flux lays it out (fp8 block linears with quantize="fp8"), the FLUX autoencoder, T5-XXL (its
    linears fp8 but wo with t5_quantize="fp8") and CLIP-L, placed as from_pretrained places them
    (`placement`: offload, model_offload, tiled_decode, each None for the default). Its memory_plan is
    the real model's."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from .pipelines import SliderEditFluxKontextPipeline, placement_defaults
    from .text_encoders import KontextTextEncoders, t5_fp8_targets
    from .transformer_loading import empty_flux

    offload, model_offload, tiled_decode = placement_defaults(quantize, **placement)
    with torch.device("meta"):
        autoencoder = AutoEncoder(AutoEncoderParams.flux()).to(dtype)
        t5 = T5EncoderModel(T5Config(**T5_XXL)).to(dtype)
        clip = CLIPTextModel(CLIPTextConfig(**CLIP_L)).to(dtype)
    if t5_quantize == "fp8":
        swap_in_fp8(t5, t5_fp8_targets(t5))
    return SliderEditFluxKontextPipeline(empty_flux(FluxParams.kontext_dev(), dtype, quantize), autoencoder,
                                         KontextTextEncoders(clip, None, t5, None), offload=offload,
                                         model_offload=model_offload, tiled_decode=tiled_decode)


def plan_table(plan: MemoryPlan) -> str:
    """A markdown table of a plan in GB: each phase's peak, what is resident and the working set."""
    lines = ["| phase | peak GB | " + " | ".join(f"{c} GB" for c in COMPONENTS) + " | working set GB |",
             "|---|---|" + "---|" * len(COMPONENTS) + "---|"]
    for phase, p in plan.items():
        working = ", ".join(f"{name} {b / 1e9:.2f}" for name, b in p.working.items()) or "-"
        lines.append(f"| {phase} | {p.peak / 1e9:.2f} | " + " | ".join(f"{p.resident[c] / 1e9:.2f}" for c in COMPONENTS)
                     + f" | {working} |")
    return "\n".join(lines)
