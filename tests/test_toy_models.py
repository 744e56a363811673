"""The toy model family: tokenizers trained on the instruction corpus, the DiT initialisation, and a
model folder that round-trips through load_flux, load_autoencoder, KontextTextEncoders and the pipeline."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from slideredit.autoencoder import load_autoencoder
from slideredit.pipelines import SliderEditFluxKontextPipeline
from slideredit.sampling import (KontextInputs, denoise, get_schedule, initial_noise, kontext_velocity, latent_ids,
                                 pack_latents, text_ids, unpack_latents)
from slideredit.text_encoders import KontextTextEncoders
from slideredit.token_selection import subprompt_token_scales
from slideredit.toy import models
from slideredit.toy.shapes import SINGLE_EDITS, instruction_corpus, make_example, render_image
from slideredit.transformer_loading import load_flux


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    flux = models.build_flux(seed=1)
    with torch.no_grad():  # a trained-looking model: the zero-initialised pieces would hide layout mistakes
        for p in flux.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return flux, models.build_autoencoder(seed=2), models.build_text_encoders(seed=3)


@pytest.fixture(scope="module")
def folder(parts, tmp_path_factory):
    return models.save_model_folder(tmp_path_factory.mktemp("toy") / "model", *parts)


def test_t5_tokenizer_has_one_token_per_corpus_word():
    tokenizer = models.make_t5_tokenizer()
    words = sorted({w for line in instruction_corpus() for w in line.split()})
    for word in words:
        assert tokenizer.convert_ids_to_tokens(tokenizer(word).input_ids) == ["▁" + word, "</s>"]
    # An unseen lowercase word is spelled out, not lost to <unk>.
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("make the circle purple").input_ids)
    assert pieces[3:-1] == ["▁", "p", "u", "r", "p", "l", "e"] and "<unk>" not in pieces


def test_every_sub_instruction_is_found_in_a_joined_prompt():
    # STLoRA selects a sub-prompt's T5 tokens inside the whole prompt: the joiner must stay outside.
    tokenizer = models.make_t5_tokenizer()
    tokenize = lambda text: tokenizer(text).input_ids
    for a, b in [(SINGLE_EDITS[0], SINGLE_EDITS[-1]), (SINGLE_EDITS[4], SINGLE_EDITS[7])]:
        prompt = f"{a.instruction} and {b.instruction}"
        scales = subprompt_token_scales(prompt, [a.instruction, b.instruction], [2.0, 3.0], tokenize, 32)
        assert scales[:4].tolist() == [2.0] * 4 and scales[4] == 0 and scales[5:9].tolist() == [3.0] * 4
        assert not scales[9:].any()


def test_clip_tokenizer_spells_corpus_words_as_single_tokens():
    tokenizer = models.make_clip_tokenizer()
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("make the square yellow").input_ids)
    assert tokens == ["<|startoftext|>", "make</w>", "the</w>", "square</w>", "yellow</w>", "<|endoftext|>"]
    # transformers finds CLIP's EOS by the largest id: it must be last in the vocabulary.
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == len(tokenizer) - 1


def test_sizes_fit_together():
    p = models.FLUX_PARAMS
    assert p.in_channels == 4 * models.AE_PARAMS.z_channels
    assert p.context_in_dim == models.T5_CONFIG["d_model"] and p.vec_in_dim == models.CLIP_CONFIG["hidden_size"]
    assert p.axes_dim == (4, 14, 14) and p.head_dim == 32


def test_flux_starts_as_adaln_zero(parts):
    flux = models.build_flux(seed=0)
    assert flux.params == models.FLUX_PARAMS
    img, txt = torch.randn(2, 128, 64), torch.randn(2, 32, 64)
    ids = torch.cat([latent_ids(2, 8, 8, 0), latent_ids(2, 8, 8, 1)], dim=1)
    out = flux(img, ids, txt, text_ids(2, 32), torch.rand(2), torch.randn(2, 32), torch.full((2,), 2.5))
    assert out.shape == (2, 128, 64) and not out.any()
    for block in flux.double_blocks:
        assert not block.img_mod.lin.weight.any() and not block.txt_mod.lin.bias.any()
    assert models.build_flux(seed=0).state_dict().keys() == flux.state_dict().keys()
    assert torch.equal(models.build_flux(seed=0).img_in.weight, flux.img_in.weight)


def test_autoencoder_maps_128_pixels_to_64_tokens(parts):
    _, ae, _ = parts
    with torch.no_grad():
        z = ae.encode(torch.zeros(1, 3, 128, 128))
    assert z.shape == (1, 16, 16, 16) and pack_latents(z).shape == (1, 64, 64)


def test_folder_layout(folder):
    names = {p.name for p in folder.iterdir()}
    assert {models.TRANSFORMER_FILE, models.AE_FILE, "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
            "scheduler", "slideredit.json"} <= names
    assert json.loads((folder / "slideredit.json").read_text()) == {"max_sequence_length": 32, "auto_resize": False}


def test_folder_loads_through_the_project_loaders(parts, folder):
    flux, ae, encoders = parts
    loaded = load_flux(folder, dtype=torch.float32)
    assert loaded.params == models.FLUX_PARAMS
    for name, tensor in flux.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    loaded_ae = load_autoencoder(folder, dtype=torch.float32)
    assert dataclasses.replace(loaded_ae.params, resolution=0) == dataclasses.replace(models.AE_PARAMS, resolution=0)
    for name, tensor in ae.state_dict().items():
        assert torch.equal(loaded_ae.state_dict()[name], tensor), name
    loaded_text = KontextTextEncoders.from_pretrained(folder, dtype=torch.float32)
    prompts = ["make the square red and make the circle larger", "keep the image the same"]
    for a, b in zip(loaded_text.encode(prompts, 32), encoders.encode(prompts, 32)):
        assert torch.equal(a, b)


def test_pipeline_edits_with_the_folder_defaults(parts, folder):
    """A 2-step edit through the pipeline equals the same edit computed by hand from the in-memory parts."""
    flux, ae, encoders = parts
    pipe = SliderEditFluxKontextPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.defaults.max_sequence_length == 32 and pipe.defaults.auto_resize is False
    example = make_example(0, 1, num_edits=1)
    source = render_image(example.source)
    out = pipe(image=source, prompt=example.instruction, num_inference_steps=2, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 128, 128)

    with torch.no_grad():
        pixels = torch.from_numpy(2 * (np.asarray(source, np.float32) / 255) - 1).permute(2, 0, 1)[None]
        cond = pack_latents(ae.encode(pixels))
        txt, pooled = encoders.encode(example.instruction, 32)
        noise = pack_latents(initial_noise(1, 128, 128, generator=torch.Generator().manual_seed(0)))
        inputs = KontextInputs(img=noise, img_ids=latent_ids(1, 8, 8, 0), txt=txt, txt_ids=text_ids(1, 32), vec=pooled,
                               cond=cond, cond_ids=latent_ids(1, 8, 8, 1))
        velocity = kontext_velocity(flux, inputs, 3.5)  # the release's default guidance
        latents = denoise(velocity, noise, get_schedule(2, 64), progress=False)
        expected = (ae.decode(unpack_latents(latents, 128, 128)) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_bfloat16_folder_loads_in_float32(parts, tmp_path):
    flux, ae, encoders = parts
    folder = models.save_model_folder(tmp_path / "bf16", flux, ae, encoders, dtype=torch.bfloat16)
    loaded = load_flux(folder, dtype=torch.float32)
    torch.testing.assert_close(loaded.img_in.weight, flux.img_in.weight.bfloat16().float(), atol=0, rtol=0)
    fp32_bytes = 4 * sum(p.numel() for p in flux.parameters())
    assert (folder / models.TRANSFORMER_FILE).stat().st_size < 0.6 * fp32_bytes


def test_saved_tokenizers_carry_no_padding_of_an_earlier_call(parts, tmp_path):
    """Encoding pads to max_length, which leaves the fast tokenizers' backends padding and truncating; the
    saved tokenizer.json must not keep that (the shipped files once did after a retraining)."""
    flux, ae, encoders = parts
    encoders.encode(["make the square red"], max_length=models.MAX_SEQUENCE_LENGTH)
    assert encoders.t5_tokenizer.backend_tokenizer.padding is not None  # what the call left behind
    folder = models.save_model_folder(tmp_path / "model", flux, ae, encoders)
    for name in ("tokenizer", "tokenizer_2"):
        saved = json.loads((folder / name / "tokenizer.json").read_text())
        assert saved["padding"] is None and saved["truncation"] is None, name
