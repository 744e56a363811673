"""load_flux: every official layout gives the same model; every bad input gives a clear error."""
import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from flux_sizes import TINY_FLUX
import slideredit.checkpoint as checkpoint
from slideredit import CheckpointError, Flux, load_flux
from test_transformer import diffusers_flux, kontext_inputs, randomize_

PARAMS = TINY_FLUX


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """One set of random weights written as a sharded diffusers folder inside a full model folder,
    and as BFL single files with and without the `model.diffusion_model.` prefix."""
    root = tmp_path_factory.mktemp("layouts")
    reference = diffusers_flux(PARAMS, seed=11)
    reference.save_pretrained(root / "full" / "transformer", max_shard_size="40KB")
    bfl = load_flux(root / "full" / "transformer", dtype=torch.float32).state_dict()
    (root / "bfl").mkdir()
    save_file(bfl, root / "bfl" / "flux1-kontext-dev.safetensors")
    save_file({f"model.diffusion_model.{k}": v for k, v in bfl.items()}, root / "prefixed.safetensors")
    return root


def run(model: Flux) -> torch.Tensor:
    with torch.no_grad():
        return model(**kontext_inputs(PARAMS))


def test_sharded_folder_is_really_sharded(layouts):
    index = json.loads((layouts / "full/transformer/diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1


@pytest.mark.parametrize("source", ["full", "full/transformer", "bfl", "bfl/flux1-kontext-dev.safetensors",
                                    "prefixed.safetensors"])
def test_every_layout_loads_identically(layouts, source):
    expected = run(load_flux(layouts / "full/transformer", dtype=torch.float32))
    model = load_flux(layouts / source, dtype=torch.float32)
    assert model.params == PARAMS
    assert torch.equal(run(model), expected)


def test_dtype_and_frozen(layouts):
    model = load_flux(layouts / "bfl", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in model.parameters())
    assert not model.training


def test_model_is_built_on_meta_without_random_init(layouts, monkeypatch):
    """nn.Linear still calls reset_parameters, but on meta tensors that allocates and computes nothing."""
    initialised_devices = set()
    original = torch.nn.Linear.reset_parameters

    def spy(self):
        initialised_devices.add(self.weight.device.type)
        original(self)

    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", spy)
    load_flux(layouts / "full", dtype=torch.float32)
    model = load_flux(layouts / "bfl", dtype=torch.float32)
    assert initialised_devices == {"meta"}
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_sizes_from_shapes_and_params_for_rope_split(layouts):
    """A BFL file carries no config: sizes come from tensor shapes, the RoPE split from FLUX's rule
    (head dim 32 -> (4, 14, 14)) unless `params` says otherwise."""
    assert load_flux(layouts / "bfl", dtype=torch.float32).params == PARAMS
    other_split = replace(PARAMS, axes_dim=(8, 12, 12))
    assert load_flux(layouts / "bfl", dtype=torch.float32, params=other_split).params == other_split


def test_params_that_contradict_the_checkpoint(layouts):
    with pytest.raises(CheckpointError, match="hidden_size=128 given but 64 found"):
        load_flux(layouts / "full", dtype=torch.float32, params=replace(PARAMS, hidden_size=128, num_heads=4))


# --- bad checkpoints ---------------------------------------------------------------------------------

def bfl_weights(layouts) -> dict[str, torch.Tensor]:
    return load_file(layouts / "bfl/flux1-kontext-dev.safetensors")


def test_missing_tensor_is_named(layouts, tmp_path):
    sd = bfl_weights(layouts)
    del sd["double_blocks.0.txt_attn.proj.bias"]
    save_file(sd, tmp_path / "flux1-kontext-dev.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor.*double_blocks\.0\.txt_attn\.proj\.bias"):
        load_flux(tmp_path, dtype=torch.float32)


def test_unexpected_tensor_is_named_with_its_file(layouts, tmp_path):
    sd = bfl_weights(layouts)
    sd["double_blocks.0.lora_A.weight"] = torch.zeros(4, 64)
    path = tmp_path / "flux1-kontext-dev.safetensors"
    save_file(sd, path)
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*double_blocks\.0\.lora_A\.weight.*flux1-kontext-dev"):
        load_flux(path, dtype=torch.float32)


def test_shape_mismatch_is_named(layouts, tmp_path):
    sd = bfl_weights(layouts)
    sd["single_blocks.1.linear2.weight"] = torch.zeros(64, 100)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"single_blocks\.1\.linear2\.weight.*\(64, 100\).*\(64, 320\)"):
        load_flux(tmp_path / "model.safetensors", dtype=torch.float32)


def test_shape_mismatch_in_a_shard_names_the_shard(layouts, tmp_path):
    import shutil
    folder = shutil.copytree(layouts / "full/transformer", tmp_path / "transformer")
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"]["transformer_blocks.0.ff.net.2.weight"]
    sd = load_file(shard)
    sd["transformer_blocks.0.ff.net.2.weight"] = torch.zeros(64, 10)
    save_file(sd, shard)
    with pytest.raises(CheckpointError, match=rf"double_blocks\.0\.img_mlp\.2\.weight.*{shard.name}"):
        load_flux(folder, dtype=torch.float32)


def test_missing_shard(layouts, tmp_path):
    import shutil
    folder = shutil.copytree(layouts / "full/transformer", tmp_path / "transformer")
    victim = sorted(folder.glob("diffusion_pytorch_model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"shards that are not in .*{victim.name}"):
        load_flux(folder, dtype=torch.float32)


def test_truncated_file(layouts, tmp_path):
    data = (layouts / "bfl/flux1-kontext-dev.safetensors").read_bytes()
    path = tmp_path / "flux1-kontext-dev.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"flux1-kontext-dev\.safetensors.*(truncated|not a readable)"):
        load_flux(path, dtype=torch.float32)


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "flux1-kontext-dev.safetensors"
    path.write_text("<html>Access to model black-forest-labs/FLUX.1-Kontext-dev is restricted</html>")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_flux(path)


def test_folder_without_checkpoint(tmp_path):
    (tmp_path / "README.md").write_text("hello")
    with pytest.raises(CheckpointError, match=r"no FLUX transformer checkpoint found.*README\.md"):
        load_flux(tmp_path)


def test_missing_path():
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_flux("/definitely/not/here")


# --- hub failures: one readable message, no HTTP stack ------------------------------------------------

def test_offline_hub_gives_one_readable_message():
    """Tests run with HF_HUB_OFFLINE=1 and an empty cache for this id: the real client fails."""
    with pytest.raises(CheckpointError, match="unreachable or offline") as info:
        load_flux("slideredit-tests/not-cached-anywhere")
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize("error, message", [
    ("GatedRepoError", "gated repository: accept its licence at https://huggingface.co/black-forest-labs/FLUX.1-Kontext-dev"),
    ("RepositoryNotFoundError", "neither a local path nor a repository"),
])
def test_hub_errors_are_translated(monkeypatch, error, message):
    import huggingface_hub
    from huggingface_hub import errors

    def fail(*args, **kwargs):
        cls = getattr(errors, error)
        raise cls.__new__(cls)  # the hub's HTTP errors need a response to construct; the type is what matters

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(CheckpointError, match=message):
        load_flux("black-forest-labs/FLUX.1-Kontext-dev")


def test_hub_fetches_only_transformer_files(monkeypatch, layouts):
    import huggingface_hub
    asked = []

    def fake_snapshot(repo_id, allow_patterns=None, ignore_patterns=None):
        asked.append((repo_id, allow_patterns))
        return str(layouts / "full")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    model = load_flux("black-forest-labs/FLUX.1-Kontext-dev", dtype=torch.float32)
    assert model.params == PARAMS
    assert asked == [("black-forest-labs/FLUX.1-Kontext-dev", ["transformer/*.json", "transformer/*.safetensors"])]
    assert checkpoint.looks_like_repo_id("black-forest-labs/FLUX.1-Kontext-dev")


# --- streaming: same bytes as reading everything, and never more than one stored tensor in flight ----

def whole_checkpoint(folder) -> dict[str, torch.Tensor]:
    """The pre-streaming reference: every tensor of every shard read, then converted in memory."""
    from slideredit.transformer_loading import diffusers_to_bfl
    sd = {}
    for shard in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(shard))
    sd = {k.removeprefix("model.diffusion_model."): v for k, v in sd.items()}
    return diffusers_to_bfl(sd)[0] if any(k.startswith("transformer_blocks.") for k in sd) else sd


@pytest.mark.parametrize("source, files", [("full/transformer", "full/transformer"), ("bfl", "bfl"),
                                           ("prefixed.safetensors", None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_weights_equal_the_whole_read(layouts, source, files, dtype):
    """The same bytes are copied (or converted by the same cast), so the weights are exactly equal."""
    if source == "prefixed.safetensors":
        reference = {k.removeprefix("model.diffusion_model."): v for k, v in load_file(layouts / source).items()}
    else:
        reference = whole_checkpoint(layouts / files)
    model = load_flux(layouts / source, dtype=dtype)
    loaded = model.state_dict()
    assert loaded.keys() == reference.keys()
    for name, tensor in reference.items():
        assert loaded[name].dtype == dtype
        assert torch.equal(loaded[name], tensor.to(dtype)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_stored_tensor_outlives_its_copy(layouts, monkeypatch, dtype):
    """Every file mapping the loader makes is gone before the next one is made, unless its tensor became
    a model tensor itself (a whole stored tensor, same dtype: kept as its mapping, nothing copied). The
    checkpoint is fp32: in bf16 every tensor is a converted copy and no mapping may survive."""
    import mmap
    import weakref

    mappings, live_at_each_call = [], []
    real_mmap = mmap.mmap

    def spy(*args, **kwargs):
        live_at_each_call.append({i for i, ref in enumerate(mappings) if ref() is not None})
        mapping = real_mmap(*args, **kwargs)
        mappings.append(weakref.ref(mapping))
        return mapping

    monkeypatch.setattr(mmap, "mmap", spy)
    model = load_flux(layouts / "full/transformer", dtype=dtype)
    monkeypatch.setattr(mmap, "mmap", real_mmap)
    survivors = {i for i, ref in enumerate(mappings) if ref() is not None}
    assert len(mappings) > 20
    assert all(live <= survivors for live in live_at_each_call)
    fused = [n for n in model.state_dict() if n.endswith(("qkv.weight", "qkv.bias", "linear1.weight", "linear1.bias",
                                                          "adaLN_modulation.1.weight", "adaLN_modulation.1.bias"))]
    assert len(survivors) == (0 if dtype == torch.bfloat16 else len(model.state_dict()) - len(fused))


@pytest.mark.parametrize("quantize", [None, "fp8"])
def test_each_model_tensor_is_allocated_once(layouts, monkeypatch, quantize):
    """Bytes allocated with torch.empty on the target device (CPU here) during the load = the final
    model's bytes: no second copy, no fused temporaries (the fused projections are written row range by
    row range; fp8 rows are quantized in place, through fp32 chunks of at most 64 MB)."""
    allocated = []
    original = torch.empty

    def spy(*args, **kwargs):
        tensor = original(*args, **kwargs)
        if tensor.device.type != "meta":
            allocated.append(tensor.numel() * tensor.element_size())
        return tensor

    monkeypatch.setattr(torch, "empty", spy)
    model = load_flux(layouts / "full/transformer", dtype=torch.bfloat16, quantize=quantize)
    monkeypatch.setattr(torch, "empty", original)
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert sum(allocated) == model_bytes
