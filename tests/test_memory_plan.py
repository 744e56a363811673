"""The device-memory plan (slideredit/memory_plan.py, pipe.memory_plan) and the low-memory placement it plans.

- FLUX.1 Kontext [dev] at its real sizes on the meta device: the low-memory edit (quantize="fp8", T5 in
  bf16 or fp8) is planned under 16 GB in every phase at 1024^2, and the placements the issue measured are
  planned over it (about 22 GB with T5 visiting the device beside the transformer, 18-20 GB with T5 in fp8
  resident). The fp8 transformer's bytes by hand from FLUX's shapes.
- The plan's activation estimates against the live tensors traced on the CPU at small sizes (every tensor
  the code creates, benchmarks/fp8_precision.py's LiveBytes), each moment as its docstring describes it.
- The tiny pipeline, the CPU playing the GPU and empty tensors the host: what the plan says is resident
  in each phase is what device_memory() reads in that phase, for each placement, and in the low-memory
  mode T5 never shares the device with the transformer.
"""
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import slideredit.pipelines as pipelines
from slideredit.autoencoder import AutoEncoder, AutoEncoderParams
from slideredit.memory_plan import (PHASES, decode_bytes, encode_bytes, full_size_pipeline, mid_attention_bytes,
                                    plan_table, strip_decode_bytes, t5_layer_bytes, transformer_block_moments)
from slideredit.pipelines import SliderEditFluxKontextPipeline
from slideredit.sampling import latent_ids, text_ids
from slideredit.sliders import GSTLORA, add_adapter, gstlora_targets, is_fused_qkv, part_rows
from slideredit.transformer import Flux, FluxParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from fp8_precision import LiveBytes, traced_strip_ops  # noqa: E402

GOAL = 16e9
PROMPT = "make the hair red and add a hat"


# ---------------------------------------------------------------------------------------------------
# The real model's plan, on the meta device
# ---------------------------------------------------------------------------------------------------

def parameters(module: nn.Module) -> int:
    """Parameter count as the model files hold it (fp8 row scales are not weights of the model)."""
    return sum(p.numel() for name, p in module.named_parameters() if not name.endswith("weight_scale"))


@pytest.mark.parametrize("t5_quantize", [None, "fp8"])
def test_the_full_size_low_memory_edit_is_planned_under_16_gb_in_every_phase(t5_quantize):
    pipe = full_size_pipeline(quantize="fp8", t5_quantize=t5_quantize)
    # the real sizes: FLUX_KONTEXT.md's counts for the transformer and the autoencoder; T5-XXL's encoder and
    # CLIP-L's text model as their bf16 files in the diffusers folder hold them (9.52 GB, 246 MB)
    assert parameters(pipe.transformer) == 11_901_408_320 and parameters(pipe.autoencoder) == 83_819_683
    assert parameters(pipe.text_encoders.t5) == 4_762_310_656 and parameters(pipe.text_encoders.clip) == 123_060_480
    assert pipe.offload and pipe.model_offload and pipe.tiled_decode  # from_pretrained's placement in this mode

    plan = pipe.memory_plan(1024, 1024, batch=1)
    assert tuple(plan) == PHASES
    assert all(phase.peak < GOAL for phase in plan.values()), plan_table(plan)
    # never two large components: T5 only while the transformer is away, and only then
    assert plan["text_encoding"].resident["transformer"] == 0 < plan["text_encoding"].resident["text_encoders"]
    assert all(plan[phase].resident["text_encoders"] == 0 for phase in PHASES if phase != "text_encoding")
    # what sets each peak: the 12.0 GB transformer plus the largest working set (about 1.4 GB)
    assert 13e9 < plan["denoising"].peak < 14e9 and 13e9 < plan["image_encoding"].peak < 14e9


def test_the_placements_the_issue_measured_are_planned_over_16_gb():
    """T5 visiting the device beside the fp8 transformer (offload without model_offload): about 22 GB while
    encoding; T5 in fp8 kept on the device (offload=False): 18-20 GB in every phase."""
    beside = full_size_pipeline(quantize="fp8", model_offload=False).memory_plan(1024, 1024)
    assert 21.5e9 < beside["text_encoding"].peak < 22.5e9
    assert all(beside[phase].peak < GOAL for phase in PHASES if phase != "text_encoding")
    resident = full_size_pipeline(quantize="fp8", t5_quantize="fp8", offload=False).memory_plan(1024, 1024)
    assert all(18e9 < phase.peak < 20e9 for phase in resident.values()), plan_table(resident)


def test_the_fp8_transformer_bytes_by_hand():
    """Block linears: one byte per weight and a 4-byte scale per output row; everything else in bf16."""
    D, M = 3072, 12288
    double_weights, double_rows = D * (3 * D + D + 2 * M + 6 * D), 3 * D + D + M + D + 6 * D  # qkv, proj, MLP, mod
    single_weights, single_rows = D * (3 * D + M) + (D + M) * D + D * 3 * D, (3 * D + M) + D + 3 * D
    fp8 = 19 * 2 * double_weights + 38 * single_weights
    rows = 19 * 2 * double_rows + 38 * single_rows
    expected = fp8 + 4 * rows + 2 * (11_901_408_320 - fp8)
    plan = full_size_pipeline(quantize="fp8").memory_plan(1024, 1024)
    assert plan["denoising"].resident["transformer"] == expected == 11_980_728_448


def meta_gstlora(model: Flux, rank: int) -> None:
    """A GSTLoRA of `rank` on the meta device (shapes only), as load_gstlora lays it out."""
    weights = {}
    for name in gstlora_targets(model):
        layer = model.get_submodule(name)
        parts = ("q", "k", "v") if is_fused_qkv(name) else ("all",)
        weights[name] = {part: (torch.empty(rank, layer.in_features, device="meta"),
                                torch.empty(end - start, rank, device="meta"))
                         for part in parts for start, end in [part_rows(part, model.params.hidden_size, layer.out_features)]}
    add_adapter(model, GSTLORA, weights)


def test_the_denoising_working_set_by_hand():
    """1024^2 in bf16: S = 512 text + 2 x 4096 image tokens. fp8 weights: the fullest moment is the single
    block's linear1 with its fp8 weight dequantized by the PyTorch path (fp32 copy and product) and the
    dispatch's second output; bf16 weights: linear2's concatenated input. A GSTLoRA (rank 16: q, k, v of
    each fused projection at rank 16 each) adds its stacked adapters (bf16) and token scales (fp32)."""
    S, D, M, e, r = 512 + 2 * 64 * 64, 3072, 12288, 2, 16
    rope = S * 128 * 4  # cos and sin, fp32
    prompts, latents = (512 * 4096 + 768) * e, 4 * 8192 * 64 * e
    linear1 = e * S * (D + D + D + (3 * D + M)) + 8 * (3 * D + M) * D + e * S * (3 * D + M) + rope
    double_stream = 3 * r * (D + 3 * D) + r * (D + D) + r * (D + M) + r * (M + D)  # qkv, proj, mlp.0, mlp.2
    stacks = e * (19 * 2 * double_stream + 38 * 3 * r * (D + 3 * D + M)) + (19 * 8 + 38) * S * 4
    fp8 = full_size_pipeline(quantize="fp8")
    meta_gstlora(fp8.transformer, r)
    assert fp8.memory_plan(1024, 1024)["denoising"].working == {
        "prompt embeddings": prompts, "latents": latents, "slider stacks (cached by an edit)": stacks,
        "transformer: single block, linear1 (fp8: PyTorch path's dequantized weight)": linear1}
    bf16 = full_size_pipeline(quantize=None).memory_plan(1024, 1024)["denoising"]
    assert bf16.working == {"prompt embeddings": prompts, "latents": latents,
                            "transformer: single block, linear2's input": e * S * (9 * D + 3 * M) + rope}


def test_bad_sizes_are_refused_in_one_line():
    pipe = full_size_pipeline(quantize="fp8")
    with pytest.raises(ValueError, match=r"^memory_plan: height and width must be positive multiples of 16 and "
                                         r"batch >= 1, got height=1000, width=1024, batch=1$"):
        pipe.memory_plan(1000, 1024)


# ---------------------------------------------------------------------------------------------------
# The activation estimates against traced tensors (CPU: flash attention, no score matrix, as on a GPU)
# ---------------------------------------------------------------------------------------------------

def traced_peak(fn, *existing) -> int:
    with torch.no_grad(), LiveBytes(*existing) as live:
        fn()
    return live.peak


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("single_blocks", [1, 0])
def test_the_transformer_block_estimate_is_the_traced_peak(dtype, single_blocks):
    """FLUX's proportions (head dim 128, MLP 4x) at width 256; with no single block the double block's
    moments are the peak. What the estimate leaves out: a few (B, width) vectors (vec, the modulations)."""
    params = FluxParams(vec_in_dim=32, context_in_dim=64, hidden_size=256, num_heads=2, depth=1,
                        depth_single_blocks=single_blocks, axes_dim=(16, 56, 56))
    model = Flux(params).to(dtype).eval()
    T, side = 16, 8
    L = 2 * side * side
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([latent_ids(1, side, side, first_id=i, device="cpu", dtype=dtype) for i in (0, 1)], dim=1)
    inputs = dict(img=torch.randn(1, L, 64, generator=g).to(dtype), img_ids=ids,
                  txt=torch.randn(1, T, 64, generator=g).to(dtype), txt_ids=text_ids(1, T, "cpu", dtype),
                  timesteps=torch.full((1,), 0.5, dtype=dtype), y=torch.randn(1, 32, generator=g).to(dtype),
                  guidance=torch.full((1,), 2.5, dtype=dtype))
    traced = traced_peak(lambda: model(**inputs), model, *inputs.values())
    moments = transformer_block_moments(params, T, L, 1, dtype.itemsize)
    planned = max(size for moment, size in moments.items() if single_blocks or moment.startswith("double"))
    assert planned <= traced <= planned + 16 * params.hidden_size * dtype.itemsize, (traced, moments)


def small_autoencoder(dtype: torch.dtype) -> tuple[AutoEncoderParams, AutoEncoder]:
    params = AutoEncoderParams(ch=32, ch_mult=(1, 2, 4, 4))  # FLUX's proportions at a quarter of its widths
    return params, AutoEncoder(params).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_autoencoder_estimates_are_the_traced_peaks(dtype):
    params, model = small_autoencoder(dtype)
    e, H, W = dtype.itemsize, 64, 96
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, H, W, generator=g).to(dtype)
    z = torch.randn(1, 16, H // 8, W // 8, generator=g).to(dtype)
    image = 3 * H * W * e  # the plan counts the context image too; here it is an input made before
    assert traced_peak(lambda: model.encode(pixels), model, pixels) == pytest.approx(
        encode_bytes(params, H, W, e) - image, rel=0.01)
    assert traced_peak(lambda: model.decode(z), model, z) == pytest.approx(decode_bytes(params, H, W, e), rel=0.01)
    assert traced_peak(lambda: model.decoder.mid(model.decoder.conv_in(z)), model, z) == \
        pytest.approx(mid_attention_bytes(params, H, W, e), rel=0.01)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_strip_decode_estimate_is_the_largest_traced_strip_op(dtype):
    """Each op of decode_tiled's up path over one strip: its input strips (moved to the device) plus what it
    creates; the mid block runs whole. A tall narrow image: the strips' working set depends on the width."""
    params, model = small_autoencoder(dtype)
    H, W, rows = 256, 96, 2
    z = torch.randn(1, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    mid = traced_peak(lambda: model.decoder.mid(model.decoder.conv_in(z)), model, z)
    with torch.no_grad(), traced_strip_ops(model) as op_peaks:
        model.decode_tiled(z, rows=rows)
    assert len(op_peaks) > 20 and max(op_peaks) > mid  # the strips, not the mid block, set this peak
    assert max(op_peaks) == pytest.approx(strip_decode_bytes(params, H, W, dtype.itemsize, rows), rel=0.01)


@pytest.mark.parametrize("tokens", [48, 96])
def test_the_t5_estimate_bounds_the_traced_peak(tokens):
    """An upper bound (position buckets, bias, hidden states and the larger layer part counted together),
    within half again of the traced peak."""
    from transformers import T5Config, T5EncoderModel

    t5 = T5EncoderModel(T5Config(d_model=64, d_kv=16, d_ff=160, num_layers=2, num_heads=4, vocab_size=100,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False))
    t5 = t5.to(torch.bfloat16).eval()
    ids = torch.randint(0, 100, (1, tokens), generator=torch.Generator().manual_seed(0))
    traced = traced_peak(lambda: t5(ids), t5, ids)
    assert traced <= t5_layer_bytes(t5, tokens, 1, 2) <= 1.5 * traced


# ---------------------------------------------------------------------------------------------------
# The tiny pipeline: planned residency = what it holds; T5 never beside the transformer
# ---------------------------------------------------------------------------------------------------

class FakeHost:
    """On a CPU-only machine the CPU plays the GPU, so the host must be something else: pipelines.OFFLOAD_DEVICE
    becomes the meta device, and a module sent there keeps its tensors aside, holding empty ones meanwhile
    (same tensor objects, so tied weights stay tied); it gets them back when sent to the pipeline's device.
    device_memory() then reads 0 for it as on a GPU, and a component used while away fails. `states`
    records, after every move, where the transformer and T5 are."""

    def __init__(self, monkeypatch, pipe: SliderEditFluxKontextPipeline):
        monkeypatch.setattr(pipelines, "OFFLOAD_DEVICE", torch.device("meta"))
        self.pipe, self.states = pipe, []
        for module in (pipe.transformer, pipe.text_encoders):
            monkeypatch.setattr(module, "to", self.mover(module), raising=False)
        if pipe.offload:  # where from_pretrained put them: on the host
            pipe.text_encoders.to(pipelines.OFFLOAD_DEVICE)

    def mover(self, module: nn.Module):
        away: list[tuple[torch.Tensor, torch.Tensor]] = []  # (the module's tensor, its data while away)

        def to(device):
            device = torch.device(device)
            if device == pipelines.OFFLOAD_DEVICE and not away:
                for t in [*module.parameters(), *module.buffers()]:
                    away.append((t, t.data))
                    t.data = t.data.new_empty(0)
            elif device != pipelines.OFFLOAD_DEVICE and away:
                assert device == self.pipe.device, f"{type(module).__name__} came back to {device}"
                for t, data in away:
                    t.data = data
                away.clear()
            self.states.append(self.where())
            return module

        return to

    def where(self) -> dict[str, str]:
        """"device" or "host" for the transformer and T5."""
        return {name: "host" if next(module.parameters()).numel() == 0 else "device"
                for name, module in (("transformer", self.pipe.transformer), ("t5", self.pipe.text_encoders.t5))}


def edit(pipe: SliderEditFluxKontextPipeline) -> torch.Tensor:
    """A 2-step 48x32 edit from a prompt (text encoding included) of a fixed random image."""
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    latents = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(2))
    return pipe(image=image, prompt=PROMPT, num_inference_steps=2, height=32, width=48, latents=latents,
                output_type="pt", auto_resize=False, max_sequence_length=24).images


def phase_hooks(pipe: SliderEditFluxKontextPipeline, record) -> list:
    """Forward pre-hooks calling record(phase) when each phase's model runs."""
    modules = {"text_encoding": [pipe.text_encoders.t5, pipe.text_encoders.clip],
               "image_encoding": [pipe.autoencoder.encoder], "denoising": [pipe.transformer],
               "decoding": [pipe.autoencoder.decoder.conv_in]}  # decode and decode_tiled both start there
    return [m.register_forward_pre_hook(lambda module, args, phase=phase: record(phase))
            for phase, ms in modules.items() for m in ms]


PLACEMENTS = {"low-memory (fp8)": dict(quantize="fp8"),
              "low-memory, T5 fp8": dict(quantize="fp8", t5_quantize="fp8"),
              "fp8, T5 visits beside the transformer": dict(quantize="fp8", model_offload=False),
              "everything on the device": dict()}


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_the_planned_residency_is_what_the_pipeline_holds_in_each_phase(tiny_kontext_dir, monkeypatch, placement):
    pipe = SliderEditFluxKontextPipeline.from_pretrained(tiny_kontext_dir, torch_dtype=torch.float32,
                                                         **PLACEMENTS[placement])
    pipe.set_progress_bar_config(disable=True)
    plan = pipe.memory_plan(32, 48)  # before the fake host empties what it holds
    FakeHost(monkeypatch, pipe)
    held = defaultdict(list)
    held["load"].append(pipe.device_memory())
    hooks = phase_hooks(pipe, lambda phase: held[phase].append(pipe.device_memory()))
    try:
        image = edit(pipe)
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.isfinite(image).all()
    for phase in PHASES:
        assert held[phase] and all(seen == plan[phase].resident for seen in held[phase]), (phase, held[phase])
    assert pipe.device_memory() == plan["load"].resident  # back in place after the edit
    if pipe.model_offload:  # the transformer really left (the tiny T5 is larger than the tiny transformer)
        assert plan["text_encoding"].resident["transformer"] == 0 < plan["denoising"].resident["transformer"]


@pytest.mark.parametrize("t5_quantize", [None, "fp8"])
def test_in_the_low_memory_mode_t5_never_shares_the_device_with_the_transformer(tiny_kontext_dir, monkeypatch,
                                                                                t5_quantize):
    pipe = SliderEditFluxKontextPipeline.from_pretrained(tiny_kontext_dir, torch_dtype=torch.float32,
                                                         quantize="fp8", t5_quantize=t5_quantize)
    pipe.set_progress_bar_config(disable=True)
    host = FakeHost(monkeypatch, pipe)
    encoding = []
    hook = pipe.text_encoders.t5.register_forward_pre_hook(lambda module, args: encoding.append(host.where()))
    try:
        edit(pipe)
        pipe.encode_prompt(PROMPT, 24)  # on its own too, as infer.py's sweep encodes once
    finally:
        hook.remove()
    assert encoding == [{"transformer": "host", "t5": "device"}] * 2
    assert host.states and {"transformer": "device", "t5": "device"} not in host.states, host.states
    assert host.where() == {"transformer": "device", "t5": "host"}  # between encodes: T5 on the host


def test_the_pipeline_device_stays_put_while_the_transformer_is_away(tiny_kontext_dir):
    """While model_offload has the transformer on the host, the pipeline still computes on (and
    device_memory() still reads) its own device: the autoencoder's, which never leaves."""
    pipe = SliderEditFluxKontextPipeline.from_pretrained(tiny_kontext_dir, torch_dtype=torch.float32, quantize="fp8")
    held = pipe.device_memory()
    pipe.transformer.to("meta")  # away from the device (the CPU here), as the CPU is away from a GPU
    assert pipe.device == torch.device("cpu") and pipe.device_memory() == {**held, "transformer": 0}


def test_model_offload_needs_offload():
    with pytest.raises(ValueError, match=r"^model_offload=True needs offload=True: the transformer leaves"):
        pipelines.placement_defaults("fp8", offload=False, model_offload=True)
