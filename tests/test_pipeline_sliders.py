"""The release's slider API on the pipeline: load_gstlora / load_stlora, call semantics, bad inputs,
and GSTLoRA parity with diffusers + peft loading the same file."""
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from slideredit import CheckpointError
from slideredit.pipelines import SliderEditFluxKontextPipeline
from slideredit.sliders import loaded_adapters
from test_infer import TINY
from test_sliders import release_checkpoint

PROMPT = "make the hair red and add a hat"


@pytest.fixture(scope="module")
def pipe(tiny_kontext_dir):
    pipe = SliderEditFluxKontextPipeline.from_pretrained(tiny_kontext_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def gst_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gst")
    save_file(release_checkpoint("gstlora", TINY, seed=4), folder / "pytorch_lora_weights.safetensors")
    return folder


@pytest.fixture(scope="module")
def st_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("st") / "selective_lora.pt"
    torch.save(release_checkpoint("stlora", TINY, seed=5), path)
    return path


def close(got: torch.Tensor, expected: torch.Tensor, ulps: int = 64) -> bool:
    """Equal up to `ulps` units of float32 rounding relative to the output's scale."""
    return bool((got - expected).abs().max() <= ulps * torch.finfo(torch.float32).eps * expected.abs().max())


def image():
    return Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8))


def edit(pipe, **kwargs):
    latents = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(2))
    kwargs = {"prompt": PROMPT, "num_inference_steps": 3, **kwargs}
    return pipe(image=image(), guidance_scale=2.5, height=32, width=48, latents=latents, output_type="pt",
                auto_resize=False, **kwargs).images


@pytest.mark.parametrize("alpha", [0.6, -1.0])
def test_gstlora_matches_diffusers_and_peft(tiny_kontext_dir, pipe, gst_folder, alpha):
    from diffusers import FluxKontextPipeline

    reference = FluxKontextPipeline.from_pretrained(tiny_kontext_dir, torch_dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(gst_folder, weight_name="pytorch_lora_weights.safetensors", adapter_name="gst")
    reference.set_adapters(["gst"], [alpha])
    latents = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(2))
    expected = reference(image=image(), prompt=PROMPT, num_inference_steps=3, guidance_scale=2.5, height=32,
                         width=48, latents=latents, output_type="pt", _auto_resize=False, max_area=32 * 48).images

    pipe.load_gstlora(gst_folder)
    try:
        got = edit(pipe, slider_alpha=alpha)
        base = edit(pipe)
    finally:
        pipe.unload_sliders()
    assert (got - expected).abs().max() <= 1e-4
    assert (got - base).abs().max() > 1e-3  # the slider changed the edit


def test_alpha_zero_and_unload_give_the_base_edit(pipe, gst_folder, st_file):
    base = edit(pipe)
    pipe.load_gstlora(gst_folder)
    pipe.load_stlora(st_file, lora_rank=4)
    try:
        # alpha 0 runs the fused kernel (x flattened to 2-D), the base runs nn.Linear on 3-D x: different
        # GEMM routes on some CPUs, so a few float32 ULPs after 3 steps and the decoder (measured: one ULP
        # of noise on every linear output moves these images by 9 ULPs of their scale)
        assert close(edit(pipe, slider_alpha=0.0), base)
        assert close(edit(pipe, subprompts_list=["add a hat"], slider_alpha_list=[0.0]), base)
        assert torch.equal(edit(pipe), base)  # sliders loaded but not asked for: off (the same nn.Linear GEMMs)
        moved = edit(pipe, slider_alpha=0.5, subprompts_list=["add a hat"], slider_alpha_list=[1.0])
        assert (moved - base).abs().max() > 1e-3
    finally:
        pipe.unload_sliders()
    assert torch.equal(edit(pipe), base)


def test_stlora_release_call_shape(pipe, st_file):
    pipe.load_stlora(st_file)
    try:
        both = edit(pipe, subprompts_list=["make the hair red", "add a hat"], slider_alpha_list=[1.0, -0.5])
        one = edit(pipe, subprompts_list=["make the hair red", "add a hat"], slider_alpha_list=[1.0, 0.0])
        only_first = edit(pipe, subprompts_list=["make the hair red"], slider_alpha_list=[1.0])
    finally:
        pipe.unload_sliders()
    assert torch.equal(one, only_first)  # a 0 slider is exactly "not selected" (same scales, same kernel)
    assert (both - one).abs().max() > 1e-3


def test_stlora_bad_inputs(pipe, st_file, monkeypatch):
    pipe.load_stlora(st_file)
    try:
        with pytest.raises(ValueError, match=r"sub-prompt 'add a scarf' is not in the prompt.*tokens \["):
            edit(pipe, subprompts_list=["add a scarf"], slider_alpha_list=[1.0])
        with pytest.raises(ValueError, match="2 entries but slider_alpha_list has 1"):
            edit(pipe, subprompts_list=["add a hat", "make the hair red"], slider_alpha_list=[1.0])
        with pytest.raises(ValueError, match="finite"):
            edit(pipe, subprompts_list=["add a hat"], slider_alpha_list=[math.nan])
        long_prompt = "make the hair red and " * 150 + "add a hat"
        with pytest.raises(ValueError, match="past the 512-token truncation"):  # found before encoding
            with monkeypatch.context() as m:
                m.setattr(pipe.text_encoders, "encode", lambda *a, **k: pytest.fail("text encoders ran"))
                edit(pipe, prompt=long_prompt, subprompts_list=["add a hat"], slider_alpha_list=[1.0])
        with pytest.raises(ValueError, match="slider_alpha needs a GSTLoRA"):
            edit(pipe, slider_alpha=1.0)
    finally:
        pipe.unload_sliders()
    with pytest.raises(ValueError, match="need an STLoRA"):
        edit(pipe, subprompts_list=["add a hat"], slider_alpha_list=[1.0])


def test_gstlora_bad_inputs(pipe, gst_folder, tmp_path):
    pipe.load_gstlora(gst_folder)
    try:
        with pytest.raises(ValueError, match="slider_alpha must be a finite number"):
            edit(pipe, slider_alpha=math.inf)
    finally:
        pipe.unload_sliders()
    with pytest.raises(CheckpointError, match="no gstlora checkpoint in this folder"):
        pipe.load_gstlora(tmp_path)
    with pytest.raises(CheckpointError, match="lora_rank=16 was given"):
        pipe.load_gstlora(gst_folder, lora_rank=16)


def test_release_loader_arguments(pipe, gst_folder, st_file):
    """The release passes lora_rank and lora_dropout; dropout is inactive at inference, so only its range is checked."""
    pipe.load_stlora(st_file, lora_rank=4, lora_dropout=0.0)
    pipe.load_gstlora(gst_folder, lora_rank=4, lora_dropout=0.1)
    pipe.unload_sliders()
    for bad in (1.0, -0.1, math.nan, "0"):
        with pytest.raises(ValueError, match="lora_dropout must be a number in \\[0, 1\\)"):
            pipe.load_stlora(st_file, lora_dropout=bad)
    assert not loaded_adapters(pipe.transformer)  # refused before anything was attached


def test_alpha_far_outside_the_trained_range_warns(pipe, gst_folder):
    pipe.load_gstlora(gst_folder)
    try:
        with pytest.warns(UserWarning, match=r"slider_alpha = 1000000.0 is far outside"):
            edit(pipe, slider_alpha=1e6, num_inference_steps=1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            edit(pipe, slider_alpha=-10.0, num_inference_steps=1)  # the documented edge: no warning
    finally:
        pipe.unload_sliders()
