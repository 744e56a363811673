import shutil
import warnings

import pytest
import torch

from slideredit.checkpoint import CheckpointError
from slideredit.text_encoders import KontextTextEncoders
from tiny_kontext import CLIP_CONFIG, T5_CONFIG

PROMPTS = ["make the hair curly and add a red hat", "keep the image the same"]


@pytest.fixture(scope="module")
def encoders(tiny_kontext_dir):
    return KontextTextEncoders.from_pretrained(tiny_kontext_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def pipeline(tiny_kontext_dir):
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline.from_pretrained(tiny_kontext_dir, dtype=torch.float32)


def diffusers_encode(pipeline, prompts, max_length=512):
    with torch.no_grad():  # as in FluxKontextPipeline.__call__ (autograd mode changes the CPU attention kernel)
        embeds, pooled, _ = pipeline.encode_prompt(prompts, prompt_2=None, device="cpu", max_sequence_length=max_length)
    return embeds, pooled


@pytest.mark.parametrize("prompts, max_length", [(PROMPTS, 512), (PROMPTS[0], 512), (PROMPTS, 64)])
def test_encode_matches_diffusers(encoders, pipeline, prompts, max_length):
    t5_embeds, pooled = encoders.encode(prompts, max_length=max_length)
    expected_embeds, expected_pooled = diffusers_encode(pipeline, prompts, max_length)
    batch = 1 if isinstance(prompts, str) else len(prompts)
    assert t5_embeds.shape == (batch, max_length, T5_CONFIG["d_model"])
    assert pooled.shape == (batch, CLIP_CONFIG["hidden_size"])
    assert torch.equal(t5_embeds, expected_embeds)
    assert torch.equal(pooled, expected_pooled)


def test_padding_is_attended_to(encoders):
    """No attention mask: the padding tokens' states depend on the prompt and vice versa."""
    a, _ = encoders.encode("add a red hat", max_length=32)
    b, _ = encoders.encode("add a red hat", max_length=64)
    assert not torch.allclose(a[:, :5], b[:, :5])


def test_long_prompt_warns_and_still_matches_diffusers(encoders, pipeline):
    prompt = " ".join(PROMPTS * 40)
    dropped = len(encoders.t5_token_ids(prompt)) - 512
    assert dropped > 0
    with pytest.warns(UserWarning, match=f"{dropped} tokens dropped"):
        t5_embeds, pooled = encoders.encode(prompt)
    expected_embeds, expected_pooled = diffusers_encode(pipeline, prompt)
    assert torch.equal(t5_embeds, expected_embeds) and torch.equal(pooled, expected_pooled)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoders.encode(PROMPTS)


def test_t5_token_ids(encoders):
    tokenizer = encoders.t5_tokenizer
    ids = encoders.t5_token_ids(PROMPTS[0])
    assert ids == tokenizer(PROMPTS[0]).input_ids and len(ids) < 512  # unpadded
    assert ids[-1] == tokenizer.eos_token_id
    assert encoders.t5_token_ids(PROMPTS[0], add_eos=False) == ids[:-1]


def test_default_dtype_is_bf16_and_moves(tiny_kontext_dir):
    encoders = KontextTextEncoders.from_pretrained(tiny_kontext_dir)
    t5_embeds, pooled = encoders.encode("add a hat")
    assert t5_embeds.dtype == pooled.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in encoders.parameters())
    assert encoders.to("cpu") is encoders and encoders.t5.device.type == "cpu"


def test_bad_inputs(encoders):
    with pytest.raises(TypeError, match="prompts"):
        encoders.encode([])
    with pytest.raises(ValueError, match="max_length"):
        encoders.encode("hat", max_length=513)


def test_missing_folders_are_named(tmp_path, tiny_kontext_dir):
    with pytest.raises(CheckpointError, match="nowhere"):
        KontextTextEncoders.from_pretrained(tmp_path / "nowhere")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "text_encoder").symlink_to(tiny_kontext_dir / "text_encoder")
    with pytest.raises(CheckpointError, match="missing tokenizer/, text_encoder_2/, tokenizer_2/"):
        KontextTextEncoders.from_pretrained(partial)


def test_hub_errors_are_readable():
    # Tests run with HF_HUB_OFFLINE=1 (conftest): an uncached repo fails without touching the network.
    with pytest.raises(CheckpointError, match="slideredit-tests/not-a-repo"):
        KontextTextEncoders.from_pretrained("slideredit-tests/not-a-repo")


@pytest.mark.parametrize("subfolder", ["text_encoder", "text_encoder_2"])
def test_truncated_weights_are_one_clear_error(tiny_kontext_dir, tmp_path, subfolder):
    folder = tmp_path / "model"
    shutil.copytree(tiny_kontext_dir, folder, ignore=shutil.ignore_patterns("transformer", "vae"))
    weights = folder / subfolder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # the last bytes of the download never arrived
    with pytest.raises(CheckpointError, match=f"{subfolder}/model.safetensors: not a readable safetensors file") as err:
        KontextTextEncoders.from_pretrained(folder, dtype=torch.float32)
    assert "\n" not in str(err.value)
