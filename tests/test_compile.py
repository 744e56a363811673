"""Compiled blocks (slideredit/compile.py) on the shipped toy model: after warm-up, slider sweeps
never recompile, and the compiled model gives the eager results.

Recompilations are caught the official way, `torch.compiler.set_stance("fail_on_recompile")` (any
recompile raises), and counted with torch._dynamo's own counters (`unique_graphs`). The tests compile
with backend="aot_eager": whether a block recompiles is decided by dynamo's guards, which are the same
for every backend, and it keeps the suite fast (inductor's C++ build takes minutes on this CPU;
benchmarks/bench_compile.py runs inductor and states its difference to eager)."""
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from slideredit.compile import compile_blocks, uncompile_blocks
from slideredit.pipelines import SliderEditFluxKontextPipeline
from slideredit.sampling import latent_ids, text_ids
from slideredit.sliders import GSTLORA, STLORA, set_slider_scale, slider_layers
from slideredit.toy.shapes import Edit, make_example, render_image
from tolerances import assert_close_ulps

TOY = Path(__file__).resolve().parents[1] / "assets" / "toy-kontext"
COLOR, SIZE = Edit("square", "red"), Edit("circle", "larger")
PROMPT, SUBPROMPTS = f"{COLOR.instruction} and {SIZE.instruction}", [COLOR.instruction, SIZE.instruction]
ALPHAS = [-1.0, 0.0, 1.0]  # a 3 x 3 sweep keeps the test fast; benchmarks/bench_compile.py runs the 5 x 5


@pytest.fixture
def pipe():
    """A fresh pipeline with both sliders (compiling changes its blocks), a clean dynamo cache and graph
    counters (dynamo's reset keeps the counts of graphs other test files compiled)."""
    torch._dynamo.reset()
    counters.clear()
    pipe = SliderEditFluxKontextPipeline.from_pretrained(TOY, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_gstlora(TOY / "sliders" / "gstlora")
    pipe.load_stlora(TOY / "sliders" / "stlora")
    yield pipe
    torch._dynamo.reset()


def model_inputs(pipe, batch: int) -> dict:
    """One denoising step's transformer inputs: the real prompt encoding, random latents (4 x 4 target
    and context tokens)."""
    txt, vec = pipe.encode_prompt([PROMPT] * batch)
    g = torch.Generator().manual_seed(0)
    img = torch.randn(batch, 32, 64, generator=g)
    ids = torch.cat([latent_ids(batch, 4, 4, 0), latent_ids(batch, 4, 4, 1)], dim=1)
    return dict(img=img, img_ids=ids, txt=txt, txt_ids=text_ids(batch, txt.shape[1]), y=vec,
                timesteps=torch.full((batch,), 0.7), guidance=torch.full((batch,), 2.5))


def stlora_scales(pipe, alphas: list, batch: int) -> torch.Tensor:
    """The (B, T) per-token STLoRA scales the pipeline sets for these per-sub-prompt alphas."""
    schedule = pipe.slider_schedule([PROMPT] * batch, batch, 1, pipe.defaults.max_sequence_length, None,
                                    SUBPROMPTS, alphas, None)
    return schedule.scales(0, 1.0)[1]


def sweep(pipe, cells: list, set_cell) -> list[torch.Tensor]:
    inputs = model_inputs(pipe, 1)
    outs = []
    for cell in cells:
        set_cell(cell)
        outs.append(pipe.transformer(**inputs))
    return outs


def test_an_stlora_sweep_never_recompiles_and_equals_eager(pipe):
    cells = [(a, b) for a in ALPHAS for b in ALPHAS]  # includes (0, 0): every scale zero
    set_cell = lambda ab: set_slider_scale(pipe.transformer, STLORA, stlora_scales(pipe, list(ab), 1))
    eager = sweep(pipe, cells, set_cell)
    compile_blocks(pipe.transformer, backend="aot_eager")
    sweep(pipe, [(0.3, -0.7)], set_cell)  # warm-up
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 2, f"one graph per block kind expected after warm-up, got {graphs}"
    with torch.compiler.set_stance("fail_on_recompile"):
        compiled = sweep(pipe, cells, set_cell)
        set_slider_scale(pipe.transformer, STLORA, None)  # off (true CFG's negative branch): zeros, same graph
        off = sweep(pipe, [None], lambda _: None)[0]
    assert counters["stats"]["unique_graphs"] == graphs
    # The graph adds the masked-off adapters' exact zeros where eager skips them, and stacks the scales
    # in another order of operations: the same fp32 math up to a few ULPs.
    for cell, c, e in zip(cells, compiled, eager):
        assert_close_ulps(c, e, ulps=16), cell
    set_slider_scale(pipe.transformer, STLORA, stlora_scales(pipe, [0.0, 0.0], 1))
    assert_close_ulps(off, eager[cells.index((0.0, 0.0))], ulps=16)
    # the sweep really moved the output: a broken scale path would give 25 equal results
    assert (compiled[0] - compiled[-1]).abs().max() > 1e-3


def test_per_image_alphas_and_gstlora_changes_never_recompile(pipe):
    """A batch of 3 strengths: new per-image alphas (GSTLoRA (B, 1), STLoRA (B, T)), zeros and switching
    the GSTLoRA off all reuse the warmed-up graphs."""
    inputs = model_inputs(pipe, 3)

    def run(gst: list | None, st: list) -> torch.Tensor:
        set_slider_scale(pipe.transformer, GSTLORA, None if gst is None else torch.tensor(gst).reshape(3, 1))
        set_slider_scale(pipe.transformer, STLORA, stlora_scales(pipe, st, 3))
        return pipe.transformer(**inputs)

    cases = [([1.0, 0.0, -1.0], [[0.5, 0.0, -0.5], 1.0]), ([0.0, 0.0, 0.0], [[0.0] * 3, [0.0] * 3]),
             (None, [[1.0, -1.0, 0.25], 0.0])]
    eager = [run(*case) for case in cases]
    compile_blocks(pipe.transformer, backend="aot_eager")
    run([0.1, 0.2, 0.3], [[0.1, 0.2, 0.3], 0.4])  # warm-up
    with torch.compiler.set_stance("fail_on_recompile"):
        compiled = [run(*case) for case in cases]
    for case, c, e in zip(cases, compiled, eager):
        assert_close_ulps(c, e, ulps=16), case
    # each image got its own strengths: image 0 and image 2 of the first case differ
    assert (compiled[0][0] - compiled[0][2]).abs().max() > 1e-3


def test_pipe_compile_images_equal_eager_without_recompiling(pipe):
    """Through the pipeline (2 steps, a batch of 3 strengths per call, 64 x 64 outputs)."""
    image = render_image(make_example(50_000, 0, num_edits=0).source)

    def edit(alphas: list) -> torch.Tensor:
        return pipe(image=image, prompt=PROMPT, num_inference_steps=2, height=64, width=64, output_type="pt",
                    generator=torch.Generator().manual_seed(0), subprompts_list=SUBPROMPTS,
                    slider_alpha_list=alphas).images

    calls = [[[-1.0, 0.0, 1.0], 0.5], [0.0, [1.0, -1.0, 0.0]]]
    eager = [edit(a) for a in calls]
    assert pipe.compile(backend="aot_eager") is pipe
    edit([[0.2, 0.4, 0.6], -0.3])  # warm-up
    with torch.compiler.set_stance("fail_on_recompile"):
        compiled = [edit(a) for a in calls]
    for c, e in zip(compiled, eager):
        assert_close_ulps(c, e, ulps=16)


def eager(model, inputs: dict) -> torch.Tensor:
    """The reference for a compiled result: the same model, weights and scales, run uncompiled."""
    uncompile_blocks(model)
    return model(**inputs)


def test_an_adapter_first_scaled_after_compiling_equals_eager(pipe):
    """STLoRA gets its first scales after compile_blocks, beside a GSTLoRA that was on before: the
    compiled blocks must apply both, not only the adapters scaled when they were compiled."""
    model, inputs = pipe.transformer, model_inputs(pipe, 1)
    set_slider_scale(model, GSTLORA, 0.5)
    compile_blocks(model, backend="aot_eager")
    gstlora_only = model(**inputs)
    set_slider_scale(model, STLORA, stlora_scales(pipe, [1.0, -1.0], 1))
    compiled = model(**inputs)
    assert_close_ulps(compiled, eager(model, inputs), ulps=16)  # as in the sweeps above
    assert (compiled - gstlora_only).abs().max() > 1e-3  # the STLoRA moved the output


def lora_parameters(model) -> list[torch.nn.Parameter]:
    return [p for _, layer in slider_layers(model) for a in layer.adapters.values() for p in a.parameters()]


@pytest.mark.parametrize("change", ["copy_", "optimizer step"])
def test_compiled_blocks_follow_an_in_place_change_of_the_adapters(pipe, change):
    """New LoRA values written into the same tensors (load_state_dict's copy_, an optimizer step between
    validation runs) reach the compiled blocks at the next call, without setting the scales again."""
    model, inputs = pipe.transformer, model_inputs(pipe, 1)
    set_slider_scale(model, GSTLORA, 0.5)
    set_slider_scale(model, STLORA, stlora_scales(pipe, [1.0, -1.0], 1))
    compile_blocks(model, backend="aot_eager")
    before = model(**inputs)
    params = lora_parameters(model)
    if change == "copy_":
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in params:
                p.copy_(torch.randn(p.shape, generator=g) * p.std())
    else:
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=1e-2)
        model(**inputs).square().mean().backward()  # through the compiled blocks
        optimizer.step()
    with torch.no_grad():  # a validation run: the stack built outside the graph
        compiled = model(**inputs)
        assert_close_ulps(compiled, eager(model, inputs), ulps=16)
    assert (compiled - before).abs().max() > 1e-3  # the change moved the output


def test_from_pretrained_compile_compiles_every_block():
    torch._dynamo.reset()
    pipe = SliderEditFluxKontextPipeline.from_pretrained(TOY, torch_dtype=torch.float32, compile=True)
    blocks = [*pipe.transformer.double_blocks, *pipe.transformer.single_blocks]
    assert all(b._compiled_call_impl is not None for b in blocks)
    assert pipe.transformer.img_in._compiled_call_impl is None  # only the repeated blocks
