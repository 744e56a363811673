"""python -m slideredit.export: a GSTLoRA as (a) diffusers/PEFT and (b) kohya/ComfyUI files. Each loads back
through our loaders to exactly the same adapter; (a) loads into diffusers + peft to the same edit; (b),
merged into the weights the way ComfyUI's LoRA loader does it (written here from its documented key
mapping), gives the same transformer output at strength s as our slider at alpha s. STLoRA is refused."""
from __future__ import annotations

import stat
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file, save_file

from slideredit.export import COMFYUI_FILE, DIFFUSERS_FILE, ExportError, export_gstlora, import_comfyui, main
from slideredit.slider_checkpoints import adapter_state_dict, diffusers_name, load_adapter
from slideredit.sliders import GSTLORA, STLORA, set_slider_scale
from test_sliders import PARAMS, double_inputs, forward, release_checkpoint, tiny_model
from tolerances import assert_close_ulps


def bfl_checkpoint(release: dict[str, torch.Tensor], params=PARAMS) -> dict[str, torch.Tensor]:
    """The same adapter under BFL-style names: q, k, v fused into one LoRA per projection.

    A = [A_q; A_k; A_v] and B block-diagonal, the rank tripled; the other layers keep their LoRA."""
    out = {}
    hidden = params.hidden_size
    blocks = [(f"double_blocks.{i}.{s}_attn.qkv", "transformer_blocks", i, prefix)
              for i in range(params.depth) for s, prefix in (("img", ""), ("txt", "add_"))]
    blocks += [(f"single_blocks.{i}.linear1", "single_transformer_blocks", i, "")
               for i in range(params.depth_single_blocks)]
    used = set()
    for module, root, i, prefix in blocks:
        names = [f"transformer.{root}.{i}.attn.{'to_' if not prefix else prefix}{p}{'_proj' if prefix else ''}"
                 for p in "qkv"]
        a = torch.cat([release[f"{n}.lora_A.weight"] for n in names])
        b = torch.block_diag(*[release[f"{n}.lora_B.weight"] for n in names])
        assert b.shape == (3 * hidden, a.shape[0])
        out[f"{module}.lora_A.weight"], out[f"{module}.lora_B.weight"] = a, b
        used |= {f"{n}.lora_{h}.weight" for n in names for h in "AB"}
    for bfl, diffusers in [("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
                           ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
                           ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2")]:
        for i in range(params.depth):
            for h in "AB":
                key = f"transformer.transformer_blocks.{i}.{diffusers}.lora_{h}.weight"
                out[f"double_blocks.{i}.{bfl}.lora_{h}.weight"] = release[key]
                used.add(key)
    assert used == set(release)
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

    # From BFL-style names (fused q/k/v, rank 3r), the export writes the release's names; the adapter
    # keeps every part's update B A (the fused B is block-diagonal: B_q [A_q; A_k; A_v] = B_q A_q).
    save_file(bfl_checkpoint(release), tmp_path / "bfl.safetensors")
    (from_bfl,) = export_gstlora(tmp_path / "bfl.safetensors", tmp_path / "b", ("diffusers",))
    assert set(load_file(from_bfl)) == set(release)
    _, want = loaded(tmp_path / "src")
    _, got = loaded(from_bfl)
    assert set(got) == set(want)
    for a_name in (name for name in want if name.endswith("lora_A.weight")):
        b_name = a_name.replace("lora_A", "lora_B")
        assert_close_ulps(got[b_name] @ got[a_name], want[b_name] @ want[a_name], ulps=8)


def test_comfyui_export_names_shapes_and_round_trip(tmp_path, release):
    (path,) = export_gstlora(tmp_path / "src", tmp_path / "c", ("comfyui",))
    assert path.name == COMFYUI_FILE
    tensors = load_file(path)
    hidden, mlp, r = PARAMS.hidden_size, PARAMS.mlp_hidden_dim, 4
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert len(modules) == PARAMS.depth * 8 + PARAMS.depth_single_blocks and len(tensors) == 3 * len(modules)
    assert tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (3 * r, hidden)
    assert tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape == (3 * hidden, 3 * r)
    assert tensors["lora_unet_double_blocks_1_txt_mlp_2.lora_up.weight"].shape == (hidden, r)
    up = tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    assert up.shape == (3 * hidden + mlp, 3 * r) and not up[3 * hidden:].any()  # linear1's MLP rows: untouched
    assert tensors["lora_unet_single_blocks_0_linear1.alpha"].item() == 3 * r
    assert tensors["lora_unet_double_blocks_0_img_mlp_0.alpha"].item() == r
    k_rows = up[hidden:2 * hidden]  # k's rows see only k's rank block
    assert torch.equal(k_rows[:, r:2 * r], release["transformer.single_transformer_blocks.0.attn.to_k.lora_B.weight"])
    assert not k_rows[:, :r].any() and not k_rows[:, 2 * r:].any()

    # Import back to the release's names: exactly the original adapter.
    back = import_comfyui(path, tmp_path / "back")
    _, want = loaded(tmp_path / "src")
    _, got = loaded(back)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def comfyui_merge(model: torch.nn.Module, lora: dict[str, torch.Tensor], strength: float) -> set[str]:
    """ComfyUI's LoRA loader for FLUX, by its documented rule: the BFL weight `diffusion_model.<k>.weight`
    takes the LoRA named `lora_unet_<k with dots as underscores>` (lora_up, lora_down, alpha) and becomes
    W + strength * (alpha / rank) * up @ down. Returns the LoRA names it used."""
    used = set()
    with torch.no_grad():
        for key, weight in model.state_dict(keep_vars=True).items():
            if not key.endswith(".weight"):
                continue
            name = "lora_unet_" + key[:-len(".weight")].replace(".", "_")
            if f"{name}.lora_up.weight" in lora:
                up, down = lora[f"{name}.lora_up.weight"], lora[f"{name}.lora_down.weight"]
                scale = lora[f"{name}.alpha"].item() / down.shape[0]
                weight += strength * scale * (up @ down).reshape(weight.shape)
                used.add(name)
    return used


@pytest.mark.parametrize("strength", [0.7, -1.0])
def test_comfyui_strength_is_our_alpha(tmp_path, release, strength):
    (path,) = export_gstlora(tmp_path / "src", tmp_path / "c", ("comfyui",))
    lora = load_file(path)
    merged = tiny_model(torch.float32)
    used = comfyui_merge(merged, lora, strength)
    assert {f"{name}.{half}" for name in used for half in ("lora_up.weight", "lora_down.weight", "alpha")} == set(lora)

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
    are "dense" (all non-zero) or "lower" (non-zero on and below the block diagonal, as another tool may
    write), with `mlp` zero rows below (linear1's MLP)."""
    hidden, r = PARAMS.hidden_size, 2
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(3 * hidden + mlp, 3 * r, generator=g)
    up[3 * hidden:] = 0
    if up_blocks == "lower":
        for i in range(3):
            up[i * hidden:(i + 1) * hidden, (i + 1) * r:] = 0
    name = "lora_unet_" + module.replace(".", "_")
    return {f"{name}.lora_down.weight": torch.randn(3 * r, hidden, generator=g), f"{name}.lora_up.weight": up,
            f"{name}.alpha": torch.tensor(alpha)}


@pytest.mark.parametrize("up_blocks", ["dense", "lower"])
def test_comfyui_import_of_a_fused_lora_that_is_not_block_diagonal_is_exact(tmp_path, up_blocks):
    """Such a lora_up mixes q, k and v's rank blocks, so no rank-r split exists: each of q, k, v must keep
    the whole lora_down (rank 3r). Against float64: the written parts' B (A x) equal the rows of the dense
    update (alpha / rank) * up @ down @ x (alpha 3 over rank 6: the scale 0.5 is exact in float32)."""
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
    save_file(bfl_checkpoint(release_checkpoint("gstlora", TINY, seed=4), TINY), source)
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
