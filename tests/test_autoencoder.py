"""The FLUX autoencoder against diffusers' AutoencoderKL (an independent implementation) at a tiny size,
the full-size layout against the reference manifests, and the loader's handling of bad checkpoints."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from flux_sizes import TINY_AUTOENCODER
from slideredit import autoencoder as ae_module
from slideredit.autoencoder import AutoEncoder, AutoEncoderParams, diffusers_vae_to_bfl, load_autoencoder
from slideredit.checkpoint import CheckpointError

# Copies of the reference manifests (exact names and shapes of the official files).
MANIFESTS = Path(__file__).parent / "manifests"


def manifest(name: str) -> dict:
    path = MANIFESTS / name
    if not path.is_file():
        pytest.fail(f"reference manifest {path} not found")
    return json.loads(path.read_text())


def tiny_diffusers_vae() -> AutoencoderKL:
    """diffusers' version of TINY_AUTOENCODER, every parameter randomised.

    A fresh model has GroupNorm scales of one and biases of zero, which would hide a swapped norm.
    """
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=[32] * 4, layers_per_block=2, latent_channels=16,
        norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
        use_post_quant_conv=False, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, mid_block_add_attention=True, sample_size=256)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:  # conv (C_out, C_in, kh, kw) or linear (C_out, C_in): unit-variance outputs
                p.copy_(noise / math.sqrt(p[0].numel()))
    return vae.eval()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny diffusers VAE saved as a sharded vae/ folder inside a model folder, plus its outputs."""
    vae = tiny_diffusers_vae()
    root = tmp_path_factory.mktemp("tiny_model")
    vae.save_pretrained(root / "vae", max_shard_size="300KB")
    image = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1  # non-square
    with torch.no_grad():
        latent = (vae.encode(image).latent_dist.mean - 0.1159) * 0.3611
        decoded = vae.decode(latent / 0.3611 + 0.1159).sample
    return dict(vae=vae, root=root, image=image, latent=latent, decoded=decoded)


def bfl_state_dict(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in diffusers_vae_to_bfl(vae.state_dict()).items()}


def check_against_reference(model: AutoEncoder, ref: dict, atol: float = 1e-5) -> None:
    with torch.no_grad():
        latent = model.encode(ref["image"])
        decoded = model.decode(ref["latent"])
    assert latent.shape == (2, 16, 6, 8)
    assert decoded.shape == (2, 3, 48, 64)
    torch.testing.assert_close(latent, ref["latent"], atol=atol, rtol=atol)
    torch.testing.assert_close(decoded, ref["decoded"], atol=atol, rtol=atol)


# --- parity ------------------------------------------------------------------------------------------

def test_sharded_diffusers_folder_matches_diffusers(reference):
    vae_dir = reference["root"] / "vae"
    assert (vae_dir / "diffusion_pytorch_model.safetensors.index.json").is_file(), "the fixture should be sharded"
    model = load_autoencoder(vae_dir, dtype=torch.float32)
    assert model.params == TINY_AUTOENCODER
    check_against_reference(model, reference)


def test_model_folder_holding_vae_loads(reference):
    model = load_autoencoder(reference["root"], dtype=torch.float32)
    check_against_reference(model, reference)


def test_bfl_file_matches_diffusers(reference, tmp_path):
    path = tmp_path / "ae.safetensors"
    save_file(bfl_state_dict(reference["vae"]), str(path))
    from_file = load_autoencoder(path, dtype=torch.float32)
    from_folder = load_autoencoder(tmp_path, dtype=torch.float32)  # a folder holding ae.safetensors
    assert from_file.params == TINY_AUTOENCODER  # sizes read off the tensor shapes
    check_against_reference(from_file, reference)
    check_against_reference(from_folder, reference)


def test_repo_id_downloads_only_the_vae(reference, monkeypatch):
    calls = []

    def fake_download(repo_id, allow_patterns, ignore_patterns=None):
        calls.append((repo_id, allow_patterns))
        return reference["root"]

    monkeypatch.setattr(ae_module, "download_from_hub", fake_download)
    model = load_autoencoder("someone/tiny-kontext", dtype=torch.float32)
    check_against_reference(model, reference)
    (repo_id, patterns), = calls
    assert repo_id == "someone/tiny-kontext"
    assert all(p.startswith("vae/") for p in patterns)


def test_repo_without_a_vae_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(ae_module, "download_from_hub", lambda repo_id, allow_patterns, ignore_patterns=None: tmp_path)
    with pytest.raises(CheckpointError, match="someone/transformer-only: the repository has no vae/ folder"):
        load_autoencoder("someone/transformer-only")


def test_bf16_stays_close_to_fp32(reference):
    model = load_autoencoder(reference["root"], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():
        latent = model.encode(reference["image"])
        decoded = model.decode(reference["latent"])
    assert latent.dtype == decoded.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits and the rounding errors of ~30 layers add up: diffusers' own model cast
    # to bf16 is off by 1.4% (latent) and 2.6% (image) of the output's range on this input. Allow 5%;
    # a layout bug gives errors of the order of the range itself.
    for ours, ref in ((latent, reference["latent"]), (decoded, reference["decoded"])):
        err = (ours.float() - ref).abs().max() / ref.abs().max()
        assert err < 0.05, f"bf16 relative error {err:.4f}"


def test_loaded_model_is_frozen_and_was_never_randomly_initialised(reference, monkeypatch):
    """The model is built on the meta device: initialisers only ever see meta tensors."""
    def guard(init):
        def guarded(tensor, *args, **kwargs):
            if not tensor.is_meta:
                raise AssertionError(f"{init.__name__} ran on a real {tuple(tensor.shape)} tensor")
            return init(tensor, *args, **kwargs)
        return guarded

    for name in ("kaiming_uniform_", "uniform_", "normal_", "ones_", "zeros_"):
        monkeypatch.setattr(torch.nn.init, name, guard(getattr(torch.nn.init, name)))
    with pytest.raises(AssertionError, match="kaiming_uniform_"):  # the guard does fire off the meta device
        AutoEncoder(TINY_AUTOENCODER)
    model = load_autoencoder(reference["root"], dtype=torch.float32)
    assert not any(p.is_meta or p.requires_grad for p in model.parameters())
    assert not model.training


# --- full-size layout -------------------------------------------------------------------------------

def test_flux_model_matches_the_bfl_manifest():
    expected = manifest("flux_ae_bfl.json")
    with torch.device("meta"):
        model = AutoEncoder(AutoEncoderParams.flux())
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == expected["shapes"]
    assert len(shapes) == expected["tensors"] == 244
    assert sum(p.numel() for p in model.parameters()) == expected["parameters"] == 83_819_683


def test_diffusers_manifest_converts_to_the_bfl_manifest():
    diffusers = manifest("flux_vae_diffusers.json")["shapes"]
    converted = diffusers_vae_to_bfl({k: torch.empty(v, device="meta") for k, v in diffusers.items()})
    assert {k: list(v.shape) for k, v in converted.items()} == manifest("flux_ae_bfl.json")["shapes"]


def test_up_blocks_are_renumbered_by_resolution_level():
    names = ["decoder.up_blocks.0.resnets.2.conv1.weight", "decoder.up_blocks.0.upsamplers.0.conv.bias",
             "decoder.up_blocks.3.resnets.0.conv_shortcut.weight"]
    converted = diffusers_vae_to_bfl({n: torch.empty(1, device="meta") for n in names})
    assert list(converted) == ["decoder.up.3.block.2.conv1.weight", "decoder.up.3.upsample.conv.bias",
                               "decoder.up.0.block.0.nin_shortcut.weight"]


# --- bad input ----------------------------------------------------------------------------------------

@pytest.fixture
def bfl_tensors(reference):
    return bfl_state_dict(reference["vae"])


@pytest.mark.parametrize("name", ["decoder.mid.attn_1.q.weight", "encoder.conv_in.weight", "decoder.conv_out.weight"])
def test_missing_tensor_is_named(bfl_tensors, tmp_path, name):
    del bfl_tensors[name]
    save_file(bfl_tensors, str(tmp_path / "ae.safetensors"))
    with pytest.raises(CheckpointError, match=rf"1 missing tensor\(s\): '{re.escape(name)}'") as err:
        load_autoencoder(tmp_path / "ae.safetensors")
    assert "ae.safetensors" in str(err.value)
    assert "mismatch" not in str(err.value)  # the other sizes were still read off the shapes


def test_unexpected_tensor_is_named(bfl_tensors, tmp_path):
    bfl_tensors["encoder.quant_conv.weight"] = torch.zeros(32, 32, 1, 1)
    save_file(bfl_tensors, str(tmp_path / "ae.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*encoder\.quant_conv\.weight.*ae\.safetensors"):
        load_autoencoder(tmp_path / "ae.safetensors")


def test_wrong_shape_is_named(bfl_tensors, tmp_path):
    bfl_tensors["encoder.mid.block_1.conv2.weight"] = torch.zeros(32, 32, 1, 1)
    save_file(bfl_tensors, str(tmp_path / "ae.safetensors"))
    expected = r"encoder\.mid\.block_1\.conv2\.weight.*checkpoint \(32, 32, 1, 1\), model expects \(32, 32, 3, 3\)"
    with pytest.raises(CheckpointError, match=expected):
        load_autoencoder(tmp_path / "ae.safetensors")


def test_diffusers_names_are_reported_after_conversion_with_their_shard(reference, tmp_path):
    reference["vae"].save_pretrained(tmp_path, max_shard_size="300KB")
    name = "decoder.up_blocks.1.resnets.0.conv1.weight"
    shard = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(str(tmp_path / shard))
    tensors[name] = torch.zeros(32, 32, 1, 1)
    save_file(tensors, str(tmp_path / shard))
    # up_blocks.1 is level 2 of 4 in BFL's numbering
    with pytest.raises(CheckpointError, match=rf"'decoder\.up\.2\.block\.0\.conv1\.weight' \(in .*{shard}\)"):
        load_autoencoder(tmp_path)


def test_truncated_file(bfl_tensors, tmp_path):
    path = tmp_path / "ae.safetensors"
    save_file(bfl_tensors, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="ae.safetensors"):
        load_autoencoder(path)


def test_text_file_renamed_safetensors(tmp_path):
    path = tmp_path / "ae.safetensors"
    path.write_text("<html>Access denied</html>\n")
    with pytest.raises(CheckpointError, match=r"ae\.safetensors.*not a readable safetensors file"):
        load_autoencoder(path)


def test_folder_without_a_checkpoint_says_what_it_looked_for(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "transformer").mkdir()
    with pytest.raises(CheckpointError) as err:
        load_autoencoder(tmp_path)
    message = str(err.value)
    for part in (str(tmp_path), "ae.safetensors", "diffusion_pytorch_model.safetensors", "vae/",
                 "notes.txt", "transformer/"):
        assert part in message


def test_config_with_quant_convs_is_refused(reference, tmp_path):
    reference["vae"].save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["use_quant_conv"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: use_quant_conv = True"):
        load_autoencoder(tmp_path)


def test_other_formats_and_missing_paths(tmp_path):
    (tmp_path / "ae.ckpt").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"ae\.ckpt: only \.safetensors"):
        load_autoencoder(tmp_path / "ae.ckpt")
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_autoencoder(tmp_path / "nothing_here" / "ae.safetensors")


def test_encode_rejects_bad_shapes():
    with torch.device("meta"):
        model = AutoEncoder(TINY_AUTOENCODER)
    with pytest.raises(ValueError, match=r"multiples of 8, got shape \(1, 3, 50, 64\)"):
        model.encode(torch.zeros(1, 3, 50, 64, device="meta"))
    with pytest.raises(ValueError, match=r"latents \(B, 16, h, w\), got shape \(1, 4, 6, 8\)"):
        model.decode(torch.zeros(1, 4, 6, 8, device="meta"))


