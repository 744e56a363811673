"""python -m slideredit.export: a GSTLoRA as (a) diffusers/PEFT and (b) ComfyUI files, both in the release's
diffusers names (one rank-r LoRA per projection). Each loads back through our loaders to exactly the same
adapter; each loads into diffusers + peft as one rank-r LoRA per adapted module (none on linear1's MLP rows)
with our slider's output, and (a) edits as our pipeline does; (b), merged into the weights the way ComfyUI's
LoRA loader does it (written here from its key mapping), gives the same transformer output at strength s as
our slider at alpha s. kohya files import exactly. STLoRA is refused."""
from __future__ import annotations

import re
import stat
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file, save_file

from slideredit import FluxParams, load_flux
from slideredit.export import COMFYUI_FILE, DIFFUSERS_FILE, ExportError, export_gstlora, import_comfyui, main
from slideredit.slider_checkpoints import adapter_state_dict, diffusers_name, load_adapter
from slideredit.sliders import GSTLORA, STLORA, set_slider_scale
from test_sliders import PARAMS, RANK, double_inputs, forward, release_checkpoint, tiny_model
from test_transformer import diffusers_flux, diffusers_forward
from tolerances import assert_close_ulps


# ComfyUI's map for a FLUX LoRA under diffusers names (comfy.utils.flux_to_diffusers): diffusers module in a
# block -> (BFL weight in the block, row block of hidden_size rows: 0, 1, 2 = q, k, v of a fused projection;
# None = all rows). Written from ComfyUI, independently of the library's tables.
COMFYUI_FLUX_MAP = {
    "transformer_blocks": {
        "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
        "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
        "attn.add_v_proj": ("txt_attn.qkv", 2), "attn.to_out.0": ("img_attn.proj", None),
        "attn.to_add_out": ("txt_attn.proj", None), "ff.net.0.proj": ("img_mlp.0", None),
        "ff.net.2": ("img_mlp.2", None), "ff_context.net.0.proj": ("txt_mlp.0", None),
        "ff_context.net.2": ("txt_mlp.2", None)},
    "single_transformer_blocks": {
        "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2)},
}
BFL_ROOT = {"transformer_blocks": "double_blocks", "single_transformer_blocks": "single_blocks"}


def bfl_target(lora: str) -> tuple[str, int | None]:
    """A release LoRA ("transformer.<diffusers module>") -> (BFL module, row block) by ComfyUI's map."""
    root, index, inner = lora.removeprefix("transformer.").split(".", 2)
    module, block = COMFYUI_FLUX_MAP[root][inner]
    return f"{BFL_ROOT[root]}.{index}.{module}", block


def release_loras(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The LoRA (module) names of a file in the release's naming."""
    return [key.removesuffix(".lora_A.weight") for key in tensors if key.endswith(".lora_A.weight")]


def bfl_checkpoint(release: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same adapter under BFL-style names: q, k, v fused into one LoRA per projection.

    A = [A_q; A_k; A_v] and B block-diagonal, the rank tripled; the other layers keep their LoRA."""
    by_module: dict[str, dict] = {}
    for lora in release_loras(release):
        module, block = bfl_target(lora)
        by_module.setdefault(module, {})[block] = (release[f"{lora}.lora_A.weight"], release[f"{lora}.lora_B.weight"])
    out = {}
    for module, blocks in by_module.items():
        if None in blocks:
            a, b = blocks[None]
        else:
            a = torch.cat([blocks[i][0] for i in range(3)])
            b = torch.block_diag(*[blocks[i][1] for i in range(3)])
        out[f"{module}.lora_A.weight"], out[f"{module}.lora_B.weight"] = a, b
    return out


def loaded(path) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    model = tiny_model(torch.float32)
    load_adapter(model, GSTLORA, path)
    return model, adapter_state_dict(model, GSTLORA)


@pytest.fixture
def release(tmp_path):
    tensors = release_checkpoint("gstlora", PARAMS, seed=3)
    (tmp_path / "src").mkdir()
    save_file(tensors, tmp_path / "src" / DIFFUSERS_FILE)
    return tensors


def test_diffusers_export_is_the_release_file_and_loads_back_exactly(tmp_path, release):
    (written,) = export_gstlora(tmp_path / "src", tmp_path / "a", ("diffusers",))
    assert written == tmp_path / "a" / DIFFUSERS_FILE
    exported = load_file(written)
    assert set(exported) == set(release) and all(torch.equal(exported[k], release[k]) for k in release)


def test_a_bfl_named_source_exports_as_the_release_file(tmp_path, release):
    """From BFL-style names (fused q/k/v: A = [A_q; A_k; A_v] of rank 3r, B block-diagonal), the export
    writes the release's rank-r LoRAs exactly (not three rank-3r ones sharing A), with or without linear1's
    zero MLP rows in B; non-zero MLP rows are refused, naming the file."""
    bfl = bfl_checkpoint(release)
    with_mlp_rows = dict(bfl)
    for name in (name for name in bfl if name.endswith("linear1.lora_B.weight")):
        with_mlp_rows[name] = torch.cat([bfl[name], torch.zeros(PARAMS.mlp_hidden_dim, bfl[name].shape[1])])
    for i, source in enumerate([bfl, with_mlp_rows]):
        save_file(source, tmp_path / f"bfl{i}.safetensors")
        (written,) = export_gstlora(tmp_path / f"bfl{i}.safetensors", tmp_path / f"out{i}", ("diffusers",))
        exported = load_file(written)
        assert set(exported) == set(release) and all(torch.equal(exported[k], release[k]) for k in release)

    with_mlp_rows["single_blocks.1.linear1.lora_B.weight"][-1, 0] = 1.0
    save_file(with_mlp_rows, tmp_path / "mlp.safetensors")
    with pytest.raises(ExportError, match=r"mlp\.safetensors: single_blocks\.1\.linear1 adapts the rows past q, k, v"):
        export_gstlora(tmp_path / "mlp.safetensors", tmp_path / "out")


def test_comfyui_export_is_the_diffusers_layout_and_round_trips(tmp_path, release):
    """The ComfyUI file holds the release's tensors (one rank-r LoRA per projection, diffusers names: no fused
    linear1 LoRA with zero MLP rows); imported back, it is exactly the original adapter."""
    (path,) = export_gstlora(tmp_path / "src", tmp_path / "c", ("comfyui",))
    assert path.name == COMFYUI_FILE
    tensors = load_file(path)
    assert set(tensors) == set(release) and all(torch.equal(tensors[k], release[k]) for k in release)

    back = import_comfyui(path, tmp_path / "back")
    _, want = loaded(tmp_path / "src")
    _, got = loaded(back)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def comfyui_merge(model: torch.nn.Module, lora: dict[str, torch.Tensor], strength: float) -> None:
    """ComfyUI's LoRA loader on a FLUX LoRA under diffusers names: each LoRA's B A, times strength (a file
    without alpha scales by 1), is added to the rows of the BFL weight that ComfyUI's map names."""
    hidden = model.params.hidden_size
    with torch.no_grad():
        for name in release_loras(lora):
            module, block = bfl_target(name)
            rows = slice(None) if block is None else slice(block * hidden, (block + 1) * hidden)
            update = lora[f"{name}.lora_B.weight"] @ lora[f"{name}.lora_A.weight"]
            model.get_submodule(module).weight[rows] += strength * update


@pytest.mark.parametrize("strength", [0.7, -1.0])
def test_comfyui_strength_is_our_alpha(tmp_path, release, strength):
    (path,) = export_gstlora(tmp_path / "src", tmp_path / "c", ("comfyui",))
    merged = tiny_model(torch.float32)
    comfyui_merge(merged, load_file(path), strength)

    ours = tiny_model(torch.float32)
    load_adapter(ours, GSTLORA, tmp_path / "src")
    set_slider_scale(ours, GSTLORA, strength)
    inputs = double_inputs(torch.float32)
    base = forward(tiny_model(torch.float32), inputs)
    expected = forward(merged, inputs)
    got = forward(ours, inputs)
    assert (got - base).abs().max() > 1e-2 * base.abs().max()  # the LoRA does something (a sign slip: twice it)
    # Merged weights vs the low-rank path in float32, as test_sliders.py compares them.
    assert (got - expected).abs().max() <= 2e-5 * expected.abs().max()


def fused_kohya_lora(module: str, up_blocks: str, alpha: float, seed: int, mlp: int = 0) -> dict[str, torch.Tensor]:
    """A kohya LoRA on a fused q/k/v projection, rank 3r = 6, whose lora_up's (q|k|v) x (rank block) blocks
    are "diagonal" (non-zero on the block diagonal only), "dense" (all non-zero) or "lower" (non-zero on and
    below the block diagonal, as another tool may write), with `mlp` zero rows below (linear1's MLP)."""
    hidden, r = PARAMS.hidden_size, 2
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(3 * hidden + mlp, 3 * r, generator=g)
    up[3 * hidden:] = 0
    for i in range(3):
        if up_blocks in ("lower", "diagonal"):
            up[i * hidden:(i + 1) * hidden, (i + 1) * r:] = 0
        if up_blocks == "diagonal":
            up[i * hidden:(i + 1) * hidden, :i * r] = 0
    name = "lora_unet_" + module.replace(".", "_")
    return {f"{name}.lora_down.weight": torch.randn(3 * r, hidden, generator=g), f"{name}.lora_up.weight": up,
            f"{name}.alpha": torch.tensor(alpha)}


@pytest.mark.parametrize("up_blocks", ["diagonal", "dense", "lower"])
def test_comfyui_import_of_a_fused_kohya_lora_is_exact(tmp_path, up_blocks):
    """A block-diagonal lora_up splits into rank-r LoRAs for q, k and v; one that mixes their rank blocks
    has no rank-r split, so each of q, k, v must keep the whole lora_down (rank 3r). Against float64: the
    written parts' B (A x) equal the rows of the dense update (alpha / rank) * up @ down @ x (alpha 3 over
    rank 6: the scale 0.5 is exact in float32)."""
    modules = {"double_blocks.1.txt_attn.qkv": 0, "single_blocks.2.linear1": PARAMS.mlp_hidden_dim}
    kohya = {}
    for seed, (module, mlp) in enumerate(modules.items()):
        kohya |= fused_kohya_lora(module, up_blocks, alpha=3.0, seed=seed, mlp=mlp)
    save_file(kohya, tmp_path / "lora.safetensors")
    written = load_file(import_comfyui(tmp_path / "lora.safetensors", tmp_path / "out"))

    hidden = PARAMS.hidden_size
    x = torch.randn(hidden, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    for module in modules:
        name = "lora_unet_" + module.replace(".", "_")
        up, down = kohya[f"{name}.lora_up.weight"].double(), kohya[f"{name}.lora_down.weight"].double()
        dense = 0.5 * up @ down @ x
        for i, part in enumerate("qkv"):
            lora = f"transformer.{diffusers_name(module, part)}"
            a, b = written[f"{lora}.lora_A.weight"].double(), written[f"{lora}.lora_B.weight"].double()
            assert a.shape[0] == (2 if up_blocks == "diagonal" else 6)
            # float64 both sides, sums of 6 and 96 products in another order: ~1e-15 relative
            assert_close_ulps(b @ (a @ x), dense[i * hidden:(i + 1) * hidden], ulps=64)


def test_stlora_and_bad_inputs_are_refused(tmp_path, capsys):
    st = tmp_path / "st"
    st.mkdir()
    torch.save(OrderedDict(release_checkpoint("stlora", PARAMS)), st / "selective_lora.pt")
    for source in (st, st / "selective_lora.pt"):
        with pytest.raises(ExportError, match="is an STLoRA.*per-token mask.*Export a GSTLoRA"):
            export_gstlora(source, tmp_path / "out")
    renamed = tmp_path / "renamed.safetensors"  # an STLoRA under the GSTLoRA's name is still an STLoRA
    save_file(release_checkpoint("stlora", PARAMS), renamed)
    with pytest.raises(ExportError, match="is an STLoRA"):
        export_gstlora(renamed, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ExportError, match="no such GSTLoRA"):
        export_gstlora(tmp_path / "nothing", tmp_path / "out")
    bad = tmp_path / "bad.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(3, 1),
               "something_else": torch.zeros(1)}, bad)
    with pytest.raises(ExportError, match="'something_else' is not a kohya FLUX LoRA name"):
        import_comfyui(bad, tmp_path / "out")
    mlp_rows = tmp_path / "mlp.safetensors"
    save_file({"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.ones(3, 4),
               "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.ones(20, 3)}, mlp_rows)
    with pytest.raises(ExportError, match="adapts the rows past q, k, v"):
        import_comfyui(mlp_rows, tmp_path / "out")
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "out")])
    assert "one of the two" in capsys.readouterr().err


def test_command_line_writes_both(tmp_path, release, capsys):
    written = main([str(tmp_path / "src"), "--out", str(tmp_path / "x")])
    assert written == [tmp_path / "x" / DIFFUSERS_FILE, tmp_path / "x" / COMFYUI_FILE]
    assert all(p.is_file() for p in written) and f"wrote {written[1]}" in capsys.readouterr().out
    assert main(["--from-comfyui", str(written[1]), "--out", str(tmp_path / "y")]) == [tmp_path / "y" / DIFFUSERS_FILE]
    assert diffusers_name("single_blocks.0.linear1", "q") == "single_transformer_blocks.0.attn.to_q"


def test_written_files_get_the_mode_open_would_give(tmp_path, release, umask):
    """0644 under umask 022, although safetensors' save_file creates 0600 files."""
    umask(0o022)
    written = main([str(tmp_path / "src"), "--out", str(tmp_path / "x")])
    written += main(["--from-comfyui", str(written[1]), "--out", str(tmp_path / "y")])
    assert [stat.S_IMODE(p.stat().st_mode) for p in written] == [0o644] * 3


def test_diffusers_export_loads_into_diffusers_and_peft(tmp_path, tiny_kontext_dir):
    """(a) written from a BFL-named source, loaded by diffusers + peft, edits as our pipeline does with the source."""
    from diffusers import FluxKontextPipeline

    from slideredit.pipelines import SliderEditFluxKontextPipeline
    from test_infer import TINY
    from test_pipeline_sliders import PROMPT, edit, image

    source = tmp_path / "bfl.safetensors"
    save_file(bfl_checkpoint(release_checkpoint("gstlora", TINY, seed=4)), source)
    export_gstlora(source, tmp_path / "a", ("diffusers",))

    alpha = 0.6
    reference = FluxKontextPipeline.from_pretrained(tiny_kontext_dir, torch_dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(tmp_path / "a", weight_name=DIFFUSERS_FILE, adapter_name="gst")
    reference.set_adapters(["gst"], [alpha])
    latents = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(2))
    expected = reference(image=image(), prompt=PROMPT, num_inference_steps=3, guidance_scale=2.5, height=32,
                         width=48, latents=latents, output_type="pt", _auto_resize=False, max_area=32 * 48).images

    pipe = SliderEditFluxKontextPipeline.from_pretrained(tiny_kontext_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_gstlora(source)
    got = edit(pipe, slider_alpha=alpha)
    base = edit(pipe)
    assert (got - expected).abs().max() <= 1e-4
    assert (got - base).abs().max() > 1e-3


def lora_layers(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, bool]]:
    """{module: (rank, B A all zero)} for each LoRA in a state dict: diffusers' converted file
    (`<module>.lora_A.weight`) or a model peft injected (`<module>.lora_A.<adapter>.weight`)."""
    layers = {}
    for key, a in tensors.items():
        if m := re.fullmatch(r"(.+)\.lora_A(\.\w+)?\.weight", key):
            b = tensors[key.replace(".lora_A", ".lora_B")]
            layers[m.group(1)] = (a.shape[0], not (b @ a).any())
    return layers


@pytest.mark.parametrize("file", [DIFFUSERS_FILE, COMFYUI_FILE])
def test_exports_load_into_diffusers_as_one_rank_r_lora_per_projection(tmp_path, release, file):
    """Each exported file, loaded as FluxKontextPipeline.load_lora_weights loads it (its lora_state_dict
    converter, then peft), adapts exactly the modules the release adapts, each with a rank-r LoRA that is not
    all zero: no LoRA on the single blocks' MLP (proj_mlp), no rank 3r. diffusers' output at adapter weight
    alpha is our slider's at alpha."""
    from diffusers import FluxKontextPipeline

    export_gstlora(tmp_path / "src", tmp_path / "x")
    reference = diffusers_flux(PARAMS, seed=5)
    reference.save_pretrained(tmp_path / "model")
    converted = FluxKontextPipeline.lora_state_dict(tmp_path / "x", weight_name=file)
    reference.load_lora_adapter(converted, adapter_name="gst", prefix="transformer")
    layers = lora_layers(reference.state_dict())
    assert layers == {lora.removeprefix("transformer."): (RANK, False) for lora in release_loras(release)}
    assert not any("proj_mlp" in module for module in layers)

    alpha = 0.7
    reference.set_adapters("gst", weights=alpha)
    expected = diffusers_forward(reference.double(), double_inputs())
    ours = load_flux(tmp_path / "model", dtype=torch.float64)
    load_adapter(ours, GSTLORA, tmp_path / "src")
    set_slider_scale(ours, GSTLORA, alpha)
    got = forward(ours, double_inputs())
    set_slider_scale(ours, GSTLORA, 0.0)
    base = forward(ours, double_inputs())
    # float64 except the float32 adapters (the same values on both sides) and diffusers' float32 timestep
    # embedding (3e-8, see test_bfl_layouts.py); a layout slip (a q/k/v swap, a lost LoRA) is of order 0.1
    assert (got - expected).abs().max() <= 1e-6 * expected.abs().max()
    assert (got - base).abs().max() > 1e-2 * base.abs().max()


def test_flux_width_exports_convert_to_rank_r_loras_in_diffusers(tmp_path):
    """At FLUX.1's widths (diffusers' kohya converter hard-codes linear1's split: 3 x 3072 q, k, v rows and
    12288 MLP rows), on one double and one single block: diffusers converts each exported file to one
    rank-r LoRA per adapted module, none all zero and none on proj_mlp, as peft then builds them."""
    from diffusers import FluxKontextPipeline

    release = release_checkpoint("gstlora", FluxParams(depth=1, depth_single_blocks=1), rank=2, seed=6)
    (tmp_path / "src").mkdir()
    save_file(release, tmp_path / "src" / DIFFUSERS_FILE)
    export_gstlora(tmp_path / "src", tmp_path / "x")
    for file in (DIFFUSERS_FILE, COMFYUI_FILE):
        converted = FluxKontextPipeline.lora_state_dict(tmp_path / "x", weight_name=file)
        assert lora_layers(converted) == {lora: (2, False) for lora in release_loras(release)}, file
