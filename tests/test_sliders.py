"""GSTLoRA and STLoRA on the transformer: exact algebra, token selection, the release's checkpoint formats."""
import json
import re
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flux_sizes import SMALL_FLUX
from slideredit import CheckpointError, Flux, FluxParams
from slideredit.slider_checkpoints import adapter_state_dict, load_adapter, save_adapter, to_bfl_parts, check_adapter
from slideredit.sliders import GSTLORA, STLORA, SliderLinear, remove_adapters, set_slider_scale
from test_transformer import kontext_inputs, randomize_
from tolerances import assert_close_ulps

MANIFESTS = Path(__file__).parent / "manifests"
PARAMS = SMALL_FLUX  # 2 double + 3 single blocks, hidden 96, mlp 384
RANK = 4
# "Adapter at scale 0 == base model" cannot be bit-exact on every CPU: with an adapter loaded,
# kernels/masked_lora.py flattens x to 2-D (a contiguous copy when x is a strided slice, e.g. the text
# half of the joint attention output entering txt_attn.proj), while the base path applies nn.Linear to
# the 3-D slice itself. The two take different MKL routines, bit-equal on some CPUs and some ULPs apart
# on others (AMD EPYC: float64 at every width here, float32 at widths 384 and 3072). Through a whole
# forward pass of this model the spread measured 4.6 ULPs of the output's scale; allow 64.
WHOLE_MODEL_ULPS = 64


def release_checkpoint(kind: str, params: FluxParams, rank: int = RANK, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random adapter with the release's tensor names and shapes (manifests), scaled down to `params`:
    block indices up to the model's depth, 3072 -> hidden, 12288 -> MLP width, 16 -> rank."""
    manifest = json.loads((MANIFESTS / f"slideredit_{kind}_upstream.json").read_text())["shapes"]
    size = {3072: params.hidden_size, 12288: params.mlp_hidden_dim, 16: rank}
    depth = {"transformer_blocks": params.depth, "single_transformer_blocks": params.depth_single_blocks}
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in manifest.items():
        root, index = re.search(r"(single_transformer_blocks|transformer_blocks)\.(\d+)\.", name).groups()
        if int(index) < depth[root]:
            out[name] = 0.2 * torch.randn([size[d] for d in shape], generator=gen)
    return out


def tiny_model(dtype=torch.float64, seed=0) -> Flux:
    model = Flux(PARAMS)
    randomize_(model, seed)
    return model.to(dtype).eval().requires_grad_(False)


def write(tmp_path: Path, kind: str, tensors: dict) -> Path:
    if kind == GSTLORA:
        path = tmp_path / "pytorch_lora_weights.safetensors"
        save_file(tensors, path)
    else:
        path = tmp_path / "selective_lora.pt"
        torch.save(OrderedDict(tensors), path)
    return path


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs)


def double_inputs(dtype=torch.float64, text_len=12):
    return {k: v.to(dtype) for k, v in kontext_inputs(PARAMS, text_len=text_len).items()}


# --- an independent reference: the base model with the LoRA updates added by forward hooks -------------

def reference_with_hooks(base: Flux, checkpoint: dict[str, torch.Tensor], token_scale_of) -> list:
    """Add sum over LoRAs of scale(token) * B (A x) to the output rows of each adapted module.
    Names are parsed here independently of the library's mapping tables. Slider scales are fp32 in
    the library (the kernel's scale dtype), so the reference rounds them to fp32 too."""
    dim = base.params.hidden_size
    module_of = {"to_q": ("img_attn.qkv", 0), "to_k": ("img_attn.qkv", 1), "to_v": ("img_attn.qkv", 2),
                 "to_out.0": ("img_attn.proj", None), "add_q_proj": ("txt_attn.qkv", 0),
                 "add_k_proj": ("txt_attn.qkv", 1), "add_v_proj": ("txt_attn.qkv", 2),
                 "to_add_out": ("txt_attn.proj", None)}
    updates: dict[str, list] = {}
    for name, a in checkpoint.items():
        if "lora_A" not in name:
            continue
        b = checkpoint[name.replace("lora_A", "lora_B")]
        m = re.search(r"(single_transformer_blocks|transformer_blocks)\.(\d+)\.(.+)\.lora_A", name)
        root, i, inner = m.groups()
        if root == "single_transformer_blocks":
            target, block = f"single_blocks.{i}.linear1", "qkv".index(inner[-1])
        elif inner.startswith("attn."):
            sub, block = module_of[inner[len("attn."):]]
            target = f"double_blocks.{i}.{sub}"
        else:
            stream = "img" if inner.startswith("ff.") else "txt"
            target = f"double_blocks.{i}.{stream}_mlp.{inner[-1] if inner.endswith('2') else '0'}"
            block = None
        rows = slice(None) if block is None else slice(block * dim, (block + 1) * dim)
        updates.setdefault(target, []).append((a.double(), b.double(), rows))

    handles = []
    for target, loras in updates.items():
        def hook(module, args, out, loras=loras, target=target):
            x = args[0]
            out = out.clone()
            scale = token_scale_of(target, x).float().double()[..., None]
            for a, b, rows in loras:
                out[..., rows] += scale * (x @ a.T @ b.T)
            return out
        handles.append(base.get_submodule(target).register_forward_hook(hook))
    return handles


@pytest.mark.parametrize("alpha", [1.0, -0.75, 0.3])
def test_gstlora_equals_hooked_reference(tmp_path, alpha):
    checkpoint = release_checkpoint("gstlora", PARAMS)
    model, reference = tiny_model(), tiny_model()
    load_adapter(model, GSTLORA, write(tmp_path, GSTLORA, checkpoint))
    set_slider_scale(model, GSTLORA, alpha)
    handles = reference_with_hooks(reference, checkpoint, lambda target, x: torch.full(x.shape[:-1], alpha, dtype=x.dtype))
    inputs = double_inputs()
    expected = forward(reference, inputs)
    for h in handles:
        h.remove()
    assert (forward(model, inputs) - expected).abs().max() / expected.abs().max() < 1e-12


def test_gstlora_equals_merged_weights_in_fp32(tmp_path):
    """alpha on every token == the base model with W + alpha * B A on the targeted rows."""
    alpha = 0.6
    checkpoint = release_checkpoint("gstlora", PARAMS)
    model, merged = tiny_model(torch.float32), tiny_model(torch.float32)
    load_adapter(model, GSTLORA, write(tmp_path, GSTLORA, checkpoint))
    set_slider_scale(model, GSTLORA, alpha)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, SliderLinear):
                target = merged.get_submodule(name)
                for part in module.adapters[GSTLORA].parts.values():
                    target.weight[part.start:part.end] += alpha * part.lora_B @ part.lora_A
    inputs = double_inputs(torch.float32)
    expected = forward(merged, inputs)
    assert (forward(model, inputs) - expected).abs().max() / expected.abs().max() < 2e-5


def test_alpha_zero_and_unload_are_exactly_the_base_model(tmp_path):
    base, model = tiny_model(torch.float32), tiny_model(torch.float32)
    inputs = double_inputs(torch.float32)
    expected = forward(base, inputs)
    load_adapter(model, GSTLORA, write(tmp_path, GSTLORA, release_checkpoint("gstlora", PARAMS)))
    load_adapter(model, STLORA, write(tmp_path, STLORA, release_checkpoint("stlora", PARAMS)))
    set_slider_scale(model, GSTLORA, 0.0)
    set_slider_scale(model, STLORA, torch.zeros(2, 12))
    assert_close_ulps(forward(model, inputs), expected, ulps=WHOLE_MODEL_ULPS)  # see WHOLE_MODEL_ULPS
    remove_adapters(model)
    assert not any(isinstance(m, SliderLinear) for m in model.modules())
    assert type(model.double_blocks[0].txt_attn.qkv) is torch.nn.Linear
    assert model.state_dict().keys() == base.state_dict().keys()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items())
    assert torch.equal(forward(model, inputs), expected)  # the same nn.Linear modules on the same x: exact


def test_stlora_touches_only_selected_tokens(tmp_path):
    """Per-token scales on the text stream equal hooks that add the update only to those tokens;
    an empty selection is the base model, and the values at unselected positions never matter."""
    checkpoint = release_checkpoint("stlora", PARAMS)
    model, reference = tiny_model(), tiny_model()
    load_adapter(model, STLORA, write(tmp_path, STLORA, checkpoint))
    scale = torch.zeros(2, 12, dtype=torch.float64)
    scale[:, 2:5] = 0.8
    scale[1, 7:9] = -1.2
    set_slider_scale(model, STLORA, scale)
    handles = reference_with_hooks(reference, checkpoint, lambda target, x: scale)
    inputs = double_inputs()
    expected = forward(reference, inputs)
    for h in handles:
        h.remove()
    got = forward(model, inputs)
    assert (got - expected).abs().max() / expected.abs().max() < 1e-12
    assert (got - forward(reference, inputs)).abs().max() > 1e-3  # the adapter did something

    set_slider_scale(model, STLORA, torch.zeros(2, 12))
    assert_close_ulps(forward(model, inputs), forward(reference, inputs), ulps=WHOLE_MODEL_ULPS)


def test_both_adapters_at_once_stack_in_one_call(tmp_path):
    """GSTLoRA everywhere plus STLoRA on selected text tokens, one kernel call per layer."""
    gst, st = release_checkpoint("gstlora", PARAMS, seed=1), release_checkpoint("stlora", PARAMS, seed=2)
    model, reference = tiny_model(), tiny_model()
    (tmp_path / "g").mkdir(), (tmp_path / "s").mkdir()
    load_adapter(model, GSTLORA, write(tmp_path / "g", GSTLORA, gst))
    load_adapter(model, STLORA, write(tmp_path / "s", STLORA, st))
    scale = torch.zeros(2, 12, dtype=torch.float64)
    scale[:, 3:6] = 0.5
    set_slider_scale(model, GSTLORA, -0.4)
    set_slider_scale(model, STLORA, scale)
    calls = []
    import slideredit.sliders as sliders
    original = sliders.masked_lora_linear

    def counting(x, weight, bias, lora_a, lora_b, token_scale, **kw):
        calls.append(token_scale.shape[-1])
        return original(x, weight, bias, lora_a, lora_b, token_scale, **kw)

    sliders.masked_lora_linear = counting
    try:
        got = forward(model, double_inputs())
    finally:
        sliders.masked_lora_linear = original
    handles = reference_with_hooks(reference, gst, lambda t, x: torch.full(x.shape[:-1], -0.4, dtype=x.dtype))
    handles += reference_with_hooks(reference, st, lambda t, x: scale)
    expected = forward(reference, double_inputs())
    assert (got - expected).abs().max() / expected.abs().max() < 1e-12
    text_layers = 4 * PARAMS.depth
    assert calls.count(2) == text_layers  # both sliders stacked on the text stream
    assert len(calls) == 8 * PARAMS.depth + PARAMS.depth_single_blocks


def test_qkv_loras_land_on_their_rows(tmp_path):
    checkpoint = release_checkpoint("gstlora", PARAMS)
    model = tiny_model()
    load_adapter(model, GSTLORA, write(tmp_path, GSTLORA, checkpoint))
    layer = model.single_blocks[1].linear1
    a, b = layer.adapters[GSTLORA].stacked(layer.out_features, 3 * RANK)
    dim = PARAMS.hidden_size
    k_b = checkpoint["transformer.single_transformer_blocks.1.attn.to_k.lora_B.weight"]
    k_a = checkpoint["transformer.single_transformer_blocks.1.attn.to_k.lora_A.weight"]
    assert torch.equal(b[dim:2 * dim, RANK:2 * RANK], k_b) and torch.equal(a[RANK:2 * RANK], k_a)
    assert b[3 * dim:].abs().sum() == 0  # the MLP rows of linear1 are not adapted
    assert b[:dim, RANK:].abs().sum() == 0  # q rows see only q's LoRA


def test_release_names_round_trip(tmp_path):
    for kind in (GSTLORA, STLORA):
        checkpoint = release_checkpoint(kind, PARAMS)
        model = tiny_model(torch.float32)
        load_adapter(model, kind, write(tmp_path, kind, checkpoint))
        written = adapter_state_dict(model, kind)
        assert written.keys() == checkpoint.keys()
        assert all(torch.equal(written[k], checkpoint[k]) for k in checkpoint)
        folder = tmp_path / f"saved-{kind}"
        saved = save_adapter(model, kind, folder)
        assert saved.name in ("pytorch_lora_weights.safetensors", "selective_lora.safetensors")
        again = tiny_model(torch.float32)
        load_adapter(again, kind, folder)  # a checkpoint folder is accepted too
        assert adapter_state_dict(again, kind).keys() == checkpoint.keys()


def test_bfl_style_names(tmp_path):
    """`double_blocks.{i}.img_attn.qkv.lora_A.weight` with B over the fused q/k/v rows."""
    gst = release_checkpoint("gstlora", PARAMS)
    model = tiny_model()
    load_adapter(model, GSTLORA, write(tmp_path, GSTLORA, gst))
    set_slider_scale(model, GSTLORA, 1.0)
    bfl = {}
    for name, layer in model.named_modules():
        if isinstance(layer, SliderLinear):
            a, b = layer.adapters[GSTLORA].stacked(layer.out_features, layer.adapters[GSTLORA].rank)
            rows = 3 * PARAMS.hidden_size if name.endswith(("qkv", "linear1")) else layer.out_features
            bfl[f"diffusion_model.{name}.lora_down.weight"] = a.float()
            bfl[f"diffusion_model.{name}.lora_up.weight"] = b[:rows].float()
    other = tiny_model()
    path = tmp_path / "bfl" / "lora.safetensors"
    path.parent.mkdir()
    save_file(bfl, path)
    load_adapter(other, GSTLORA, path)
    set_slider_scale(other, GSTLORA, 1.0)
    inputs = double_inputs()
    expected = forward(model, inputs)
    assert (forward(other, inputs) - expected).abs().max() / expected.abs().max() < 1e-6  # fp32 file


def test_full_size_release_manifests_fit_kontext_dev():
    with torch.device("meta"):
        model = Flux(FluxParams.kontext_dev())
    for kind, tensors, params in (("gstlora", 684, 44_826_624), ("stlora", 228, 16_809_984)):
        manifest = json.loads((MANIFESTS / f"slideredit_{kind}_upstream.json").read_text())["shapes"]
        assert len(manifest) == tensors and sum(torch.Size(s).numel() for s in manifest.values()) == params
        meta = {k: torch.empty(v, device="meta") for k, v in manifest.items()}
        weights, unknown = to_bfl_parts(meta, Path(kind))
        assert check_adapter(model, kind, weights, unknown, Path(kind), lora_rank=16) == 16


# --- bad checkpoints ---------------------------------------------------------------------------------

def test_missing_extra_and_misshaped_tensors_are_named(tmp_path):
    good = release_checkpoint("gstlora", PARAMS)
    missing = {k: v for k, v in good.items() if "transformer_blocks.1.ff_context.net.2" not in k}
    with pytest.raises(CheckpointError, match=r"missing LoRA.*transformer_blocks\.1\.ff_context\.net\.2"):
        load_adapter(tiny_model(), GSTLORA, write(tmp_path, GSTLORA, missing))
    extra = dict(good, **{"transformer.transformer_blocks.0.attn.to_z.lora_A.weight": torch.zeros(4, 96)})
    with pytest.raises(CheckpointError, match=r"unexpected.*attn\.to_z"):
        load_adapter(tiny_model(), GSTLORA, write(tmp_path, GSTLORA, extra))
    bad = dict(good)
    bad["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"] = torch.zeros(95, RANK)
    with pytest.raises(CheckpointError, match=r"double_blocks\.0\.img_attn\.qkv \(k\).*\(95, 4\).*\(96, 4\)"):
        load_adapter(tiny_model(), GSTLORA, write(tmp_path, GSTLORA, bad))
    # an STLoRA file does not fit GSTLoRA: most targets missing
    with pytest.raises(CheckpointError, match="missing LoRA"):
        load_adapter(tiny_model(), GSTLORA, write(tmp_path, GSTLORA, release_checkpoint("stlora", PARAMS)))


def test_rank_keyword_is_checked(tmp_path):
    path = write(tmp_path, STLORA, release_checkpoint("stlora", PARAMS))
    assert load_adapter(tiny_model(), STLORA, path, lora_rank=RANK) == RANK
    with pytest.raises(CheckpointError, match="lora_rank=16 was given but the tensors have rank"):
        load_adapter(tiny_model(), STLORA, path, lora_rank=16)


class NotATensor:
    pass


def test_pickles_load_only_plain_tensors(tmp_path):
    path = tmp_path / "selective_lora.pt"
    torch.save({"transformer_blocks.0.attn.add_q_proj.lora_A.weight": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_adapter(tiny_model(), STLORA, path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no stlora checkpoint in this folder"):
        load_adapter(tiny_model(), STLORA, empty)


def test_stacks_past_the_triton_limit_take_the_torch_path(tmp_path, monkeypatch):
    """Rank 48 on a fused q/k/v projection stacks to 144 > 128 rows: that layer asks for the PyTorch path."""
    import slideredit.sliders as sliders
    backends = {}
    original = sliders.masked_lora_linear

    def spy(x, weight, bias, lora_a, lora_b, token_scale, backend=None, **kw):
        backends[lora_a.shape[0]] = backend
        return original(x, weight, bias, lora_a, lora_b, token_scale, backend=backend, **kw)

    monkeypatch.setattr(sliders, "masked_lora_linear", spy)
    model = tiny_model()
    load_adapter(model, GSTLORA, write(tmp_path, GSTLORA, release_checkpoint("gstlora", PARAMS, rank=48)))
    set_slider_scale(model, GSTLORA, 1.0)
    forward(model, double_inputs())
    assert backends == {144: "torch", 48: None}


# --- two adapters of different ranks on one layer: the smaller is zero-padded ------------------------

def test_adapters_of_different_ranks_stack_on_one_layer(tmp_path, monkeypatch):
    """GSTLoRA rank 2 and STLoRA rank 5 share the text-stream layers: the kernel takes equal ranks, so
    the rank-2 stack is zero-padded (Adapter.stacked / SliderLinear.forward). Checked against the
    float64 hooked reference, which knows nothing about stacking."""
    gst = release_checkpoint("gstlora", PARAMS, rank=2, seed=3)
    st = release_checkpoint("stlora", PARAMS, rank=5, seed=4)
    model, reference = tiny_model(), tiny_model()
    (tmp_path / "g").mkdir(), (tmp_path / "s").mkdir()
    load_adapter(model, GSTLORA, write(tmp_path / "g", GSTLORA, gst))
    load_adapter(model, STLORA, write(tmp_path / "s", STLORA, st))
    scale = torch.zeros(2, 12, dtype=torch.float64)
    scale[0, 1:4], scale[1, 6:10] = 1.25, -0.5
    set_slider_scale(model, GSTLORA, 0.7)
    set_slider_scale(model, STLORA, scale)

    import slideredit.sliders as sliders
    stacked = {}
    original = sliders.masked_lora_linear

    def spy(x, weight, bias, lora_a, lora_b, token_scale, **kw):
        stacked.setdefault(token_scale.shape[-1], set()).add(lora_a.shape[0])
        return original(x, weight, bias, lora_a, lora_b, token_scale, **kw)

    monkeypatch.setattr(sliders, "masked_lora_linear", spy)
    got = forward(model, double_inputs())
    # text layers: two adapters padded to the larger stack (q/k/v: 3 x 5, else 5); image layers: GSTLoRA only
    assert stacked == {2: {2 * 15, 2 * 5}, 1: {3 * 2, 2}}

    handles = reference_with_hooks(reference, gst, lambda t, x: torch.full(x.shape[:-1], 0.7, dtype=x.dtype))
    handles += reference_with_hooks(reference, st, lambda t, x: scale)
    expected = forward(reference, double_inputs())
    for h in handles:
        h.remove()
    assert (got - expected).abs().max() / expected.abs().max() < 1e-12
    assert (expected - forward(reference, double_inputs())).abs().max() > 1e-3  # the adapters did something


# --- STLoRA token selection through the pipeline: a repeated sub-prompt, nested and overlapping spans -----

@pytest.fixture(scope="module")
def pipe64(tiny_kontext_dir):
    """The tiny Kontext pipeline in float64, so the hooked reference can be compared tightly."""
    from slideredit.pipelines import SliderEditFluxKontextPipeline

    pipe = SliderEditFluxKontextPipeline.from_pretrained(tiny_kontext_dir, torch_dtype=torch.float64)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_edit(pipe, prompt: str, **sliders) -> torch.Tensor:
    """A 1-step 32x48 edit of a fixed random image from fixed latents, 24 T5 tokens; (1, 3, 32, 48)."""
    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    latents = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return pipe(image=image, prompt=prompt, num_inference_steps=1, guidance_scale=2.5, height=32, width=48,
                latents=latents, output_type="pt", auto_resize=False, max_sequence_length=24, **sliders).images


def hooked_pipeline_edit(pipe, checkpoint, prompt: str, token_scale: dict[int, float]) -> torch.Tensor:
    """The base pipeline with the STLoRA added by hooks on the tokens {position: scale}, 0 elsewhere."""
    scale = torch.zeros(1, 24, dtype=torch.float64)
    for position, value in token_scale.items():
        scale[0, position] = value
    handles = reference_with_hooks(pipe.transformer, checkpoint, lambda target, x: scale)
    try:
        return pipeline_edit(pipe, prompt)
    finally:
        for h in handles:
            h.remove()


def t5_pieces(pipe, text: str) -> list[str]:
    tokenizer = pipe.text_encoders.t5_tokenizer
    return tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids)


# The tiny T5 tokenizer (tests/tiny_kontext.py) splits the prompts used below into these pieces; the
# expected token scales are written by hand from them.
REPEATED = "make the hair red and make the hat red"
REPEATED_PIECES = ["▁ma", "ke", "▁th", "e", "▁hair", "▁re", "d", "▁", "and",
                   "▁ma", "ke", "▁th", "e", "▁ha", "t", "▁re", "d", "</s>"]
NESTED = "make the hair red and add a hat"
NESTED_PIECES = ["▁ma", "ke", "▁th", "e", "▁hair", "▁re", "d", "▁", "and", "▁a", "d", "d", "▁a", "▁ha", "t", "</s>"]


@pytest.mark.parametrize("case", ["repeated", "nested", "overlapping"])
def test_stlora_spans_through_the_pipeline_equal_hand_written_token_scales(pipe64, tmp_path, case):
    """A sub-prompt that occurs twice scales only its FIRST occurrence (as the release does); spans
    that nest or overlap multiply their alphas on the shared tokens; every other token gets 0."""
    prompt, subprompts, alphas, token_scale, wrong = {
        # "red" (pieces 5-6) again at 15-16; taking the last match would scale 15-16
        "repeated": (REPEATED, ["red", "make the hat"], [0.8, -0.6],
                     {5: 0.8, 6: 0.8, 9: -0.6, 10: -0.6, 11: -0.6, 12: -0.6, 13: -0.6, 14: -0.6},
                     {15: 0.8, 16: 0.8, 9: -0.6, 10: -0.6, 11: -0.6, 12: -0.6, 13: -0.6, 14: -0.6}),
        # "the hair" (2-4) inside "make the hair red" (0-6); "add a hat" (9-14) on its own
        "nested": (NESTED, ["make the hair red", "the hair", "add a hat"], [0.5, -2.0, 0.75],
                   {0: 0.5, 1: 0.5, 2: -1.0, 3: -1.0, 4: -1.0, 5: 0.5, 6: 0.5, **dict.fromkeys(range(9, 15), 0.75)},
                   {0: 0.5, 1: 0.5, 2: -2.0, 3: -2.0, 4: -2.0, 5: 0.5, 6: 0.5, **dict.fromkeys(range(9, 15), 0.75)}),
        # "make the hair" (0-4) and "the hair red" (2-6) share 2-4
        "overlapping": (NESTED, ["make the hair", "the hair red"], [0.5, -2.0],
                        {0: 0.5, 1: 0.5, 2: -1.0, 3: -1.0, 4: -1.0, 5: -2.0, 6: -2.0},
                        {0: 0.5, 1: 0.5, 2: -2.0, 3: -2.0, 4: -2.0, 5: -2.0, 6: -2.0}),
    }[case]
    assert t5_pieces(pipe64, prompt) == (REPEATED_PIECES if prompt == REPEATED else NESTED_PIECES)
    checkpoint = release_checkpoint("stlora", pipe64.transformer.params, seed=6)
    path = write(tmp_path, STLORA, checkpoint)

    expected = hooked_pipeline_edit(pipe64, checkpoint, prompt, token_scale)
    pipe64.load_stlora(path)
    try:
        got = pipeline_edit(pipe64, prompt, subprompts_list=subprompts, slider_alpha_list=alphas)
    finally:
        pipe64.unload_sliders()
    assert (got - expected).abs().max() <= 1e-6  # float64 pipeline, float32 pixels
    # the test can tell: the wrong rule (last match / overwriting) gives a visibly different edit
    assert (hooked_pipeline_edit(pipe64, checkpoint, prompt, wrong) - expected).abs().max() > 1e-3
