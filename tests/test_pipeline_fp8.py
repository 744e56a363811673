"""Low-memory mode through the pipeline: from_pretrained(quantize="fp8") edits as float64 math on the
dequantized transformer (with and without a slider), the text encoders' placement in this mode, T5's
linears in fp8 (t5_quantize="fp8") against float64 math on the dequantized T5, the decode in strips one
image at a time, and bad values refused before anything loads."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from slideredit.pipelines import SliderEditFluxKontextPipeline
from slideredit.quantization import FP8, Fp8Linear, dequantize
from slideredit.sliders import GSTLORA
from slideredit.text_encoders import KontextTextEncoders
from test_sliders import release_checkpoint, write
from tolerances import assert_close_ulps

PROMPT = "make the hair red and add a hat"


def load(folder, **kwargs) -> SliderEditFluxKontextPipeline:
    pipe = SliderEditFluxKontextPipeline.from_pretrained(folder, torch_dtype=torch.float64, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def edit(pipe, **sliders) -> torch.Tensor:
    """A 2-step 32x48 edit of a fixed random image from fixed latents; (1, 3, 32, 48) in [0, 1]."""
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    latents = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return pipe(image=image, prompt=PROMPT, num_inference_steps=2, height=32, width=48, latents=latents,
                output_type="pt", auto_resize=False, max_sequence_length=24, **sliders).images


def with_dequantized_weights(plain: nn.Module, quantized: nn.Module) -> None:
    """Give `plain` (same architecture, nn.Linear everywhere) the dequantized values of `quantized`."""
    sd = quantized.state_dict()
    plain.load_state_dict({k: dequantize(v, sd[f"{k}_scale"], torch.float64) if v.dtype == FP8 else v
                           for k, v in sd.items() if not k.endswith(".weight_scale")})


@pytest.fixture(scope="module")
def pipes(tiny_kontext_dir):
    """(the fp8 pipeline, the float64 pipeline holding its dequantized transformer weights)."""
    fp8, reference = load(tiny_kontext_dir, quantize="fp8"), load(tiny_kontext_dir)
    with_dequantized_weights(reference.transformer, fp8.transformer)
    return fp8, reference


def test_fp8_edit_equals_the_dequantized_model_with_and_without_a_slider(pipes, tmp_path):
    fp8, reference = pipes
    layers = [m for m in fp8.transformer.modules() if isinstance(m, Fp8Linear)]
    assert len(layers) > 0 and fp8.transformer.img_in.weight.dtype == torch.float64 and fp8.dtype == torch.float64
    assert_close_ulps(edit(fp8), edit(reference), ulps=64)

    adapter = write(tmp_path, GSTLORA, release_checkpoint(GSTLORA, fp8.transformer.params, rank=4))
    for pipe in pipes:
        pipe.load_gstlora(adapter)
    try:
        got, expected = edit(fp8, slider_alpha=-0.8), edit(reference, slider_alpha=-0.8)
    finally:
        for pipe in pipes:
            pipe.unload_sliders()
    assert_close_ulps(got, expected, ulps=64)
    assert (got - edit(reference)).abs().max() > 1e-3  # the slider moved the edit


def test_fp8_mode_offloads_the_text_encoders_t5_fp8_included(pipes, tiny_kontext_dir):
    """The low-memory mode never holds the transformer beside T5: T5 in fp8 is offloaded too (12.0 GB of
    transformer and 5.9 GB of T5 would not fit 16 GB), and the transformer waits on the CPU while they
    encode (model_offload; tests/test_memory_plan.py follows them phase by phase)."""
    fp8, reference = pipes
    assert fp8.offload and fp8.model_offload and not reference.offload and not reference.model_offload
    explicit = load(tiny_kontext_dir, quantize="fp8", offload=False)  # an explicit choice wins
    assert not explicit.offload and not explicit.model_offload
    both = load(tiny_kontext_dir, quantize="fp8", t5_quantize="fp8")
    assert both.offload and both.model_offload
    assert isinstance(both.text_encoders.t5.encoder.block[0].layer[0].SelfAttention.q, Fp8Linear)
    assert not load(tiny_kontext_dir, t5_quantize="fp8").offload  # without quantize, T5 stays beside it


def test_fp8_mode_decodes_in_strips_one_image_at_a_time(pipes, tiny_kontext_dir, monkeypatch):
    fp8, reference = pipes
    assert fp8.tiled_decode and not reference.tiled_decode
    assert not load(tiny_kontext_dir, quantize="fp8", tiled_decode=False).tiled_decode
    calls = []
    plain = type(fp8.autoencoder).decode_tiled
    monkeypatch.setattr(type(fp8.autoencoder), "decode_tiled",
                        lambda self, z, *a, **k: calls.append(z.shape[0]) or plain(self, z, *a, **k))
    adapter_free = fp8(image=Image.new("RGB", (48, 32)), prompt=[PROMPT, PROMPT], num_inference_steps=1, height=32, width=48,
                       latents=torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
                       output_type="pt", auto_resize=False, max_sequence_length=24).images
    assert calls == [1, 1] and adapter_free.shape == (2, 3, 32, 48)


def test_device_memory_counts_what_each_component_holds(pipes):
    """fp8 weights are one byte per element instead of the float64 model's eight: by hand from the tensors."""
    fp8, reference = pipes
    got, plain = fp8.device_memory(), reference.device_memory()
    assert got.keys() == {"transformer", "autoencoder", "text_encoders"} and got["autoencoder"] == plain["autoencoder"]
    sd = fp8.transformer.state_dict()
    quantized = sum(v.numel() for v in sd.values() if v.dtype == FP8)
    scales = sum(v.numel() for k, v in sd.items() if k.endswith(".weight_scale"))
    assert got["transformer"] == plain["transformer"] - 7 * quantized + 4 * scales
    assert plain["transformer"] == 8 * sum(p.numel() for p in reference.transformer.parameters()) + \
        sum(b.numel() * b.element_size() for b in reference.transformer.buffers())
    bare = SliderEditFluxKontextPipeline(fp8.transformer, fp8.autoencoder, None)  # prompt_embeds only
    assert bare.device_memory() == {**got, "text_encoders": 0}


def test_t5_fp8_equals_float64_math_on_its_dequantized_linears(tiny_kontext_dir):
    """Every T5 linear but the feed-forward's wo holds fp8; the embeddings equal T5 with those weights
    dequantized. Against the unquantized T5 they differ (quantization happened) but far from O(1): each
    weight carries e4m3's 2.6 % RMS error, which this random T5 (unscaled attention logits, no training)
    amplifies to about 10 % (measured)."""
    fp8 = KontextTextEncoders.from_pretrained(tiny_kontext_dir, dtype=torch.float64, t5_quantize="fp8")
    plain = KontextTextEncoders.from_pretrained(tiny_kontext_dir, dtype=torch.float64)
    kinds = {name.rsplit(".", 1)[-1]: type(m) for name, m in fp8.t5.named_modules() if isinstance(m, (nn.Linear, Fp8Linear))}
    assert kinds == {"q": Fp8Linear, "k": Fp8Linear, "v": Fp8Linear, "o": Fp8Linear, "wi_0": Fp8Linear,
                     "wi_1": Fp8Linear, "wo": nn.Linear}
    unquantized, pooled = plain.encode([PROMPT, "keep the image the same"], max_length=24)
    with_dequantized_weights(plain.t5, fp8.t5)
    expected, _ = plain.encode([PROMPT, "keep the image the same"], max_length=24)
    got, got_pooled = fp8.encode([PROMPT, "keep the image the same"], max_length=24)
    assert got.dtype == torch.float64 and torch.equal(got_pooled, pooled)  # CLIP untouched
    assert_close_ulps(got, expected, ulps=64)
    relative = ((got - unquantized).norm() / unquantized.norm()).item()
    assert 0.01 < relative < 0.3


@pytest.mark.parametrize("argument", ["quantize", "t5_quantize"])
def test_unknown_quantize_values_are_refused_before_loading(tmp_path, argument):
    with pytest.raises(ValueError, match=rf"^{argument} must be one of \(None, 'fp8'\), got 'int8'$"):
        SliderEditFluxKontextPipeline.from_pretrained(tmp_path / "no-such-model", **{argument: "int8"})
    with pytest.raises(ValueError, match=r"t5_quantize must be one of"):
        KontextTextEncoders.from_pretrained(tmp_path / "no-such-model", t5_quantize="fp16")
