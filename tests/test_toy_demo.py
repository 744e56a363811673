"""The shipped toy model and its sliders (assets/toy-kontext): the embedded demo works, the edit strength
measured by the toy world's attribute readers moves monotonically with each slider, and the demo's grid is
no less faithful to its read strengths than it was measured."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import infer
from slideredit.pipelines import SliderEditFluxKontextPipeline
from slideredit.toy.demo_grid import DEMO_ALPHAS, demo_grid_fidelity
from slideredit.toy.fidelity import read_fidelity
from slideredit.toy.shapes import Edit, edit_strength, make_example, render_image, scene_from_dict

TOY = Path(__file__).resolve().parents[1] / "assets" / "toy-kontext"
DARKER, LARGER = Edit("square", "darker"), Edit("circle", "larger")
PROMPT, SUBPROMPTS = f"{DARKER.instruction} and {LARGER.instruction}", [DARKER.instruction, LARGER.instruction]
ALPHAS = [-1.0, -0.5, 0.0, 0.5, 1.0]
STEPS = 12


@pytest.fixture(scope="module")
def pipe():
    pipe = SliderEditFluxKontextPipeline.from_pretrained(TOY, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def held_out_scenes(n: int) -> list:
    """Scenes from a stream no training or benchmark used."""
    return [make_example(50_000, index, num_edits=0).source for index in range(n)]


def mean_strengths(pipe, sliders_for) -> np.ndarray:
    """(alphas, 2) mean strengths of (darker, larger) over 3 held-out scenes, all alphas of a scene in
    one batched call."""
    scenes, out = held_out_scenes(3), []
    for i, scene in enumerate(scenes):
        images = pipe(image=render_image(scene), prompt=PROMPT, num_inference_steps=STEPS,
                      generator=torch.Generator().manual_seed(i), **sliders_for(ALPHAS)).images
        out.append([[edit_strength(image, scene, edit) for edit in (DARKER, LARGER)] for image in images])
    return np.mean(out, axis=0)


def assert_runs_from_exaggerated_to_suppressed(strengths: np.ndarray, what: str) -> None:
    """Alpha 0 is the base edit, 1 suppresses it, -1 exaggerates: the strength falls as alpha grows (up
    to reading noise of 0.05), from clearly past the target at -1 to about the source at 1. Measured on
    these scenes (benchmarks/toy_sliders.py has 16): at -1 1.21-5.4, at 1 at most 0.061."""
    assert all(b <= a + 0.05 for a, b in zip(strengths, strengths[1:])), f"{what}: {strengths} over {ALPHAS}"
    assert strengths[0] > 1.1 and abs(strengths[-1]) < 0.1, f"{what}: {strengths} over {ALPHAS}"


def test_the_base_model_carries_out_both_edits_of_the_demo_prompt(pipe):
    """Measured 1.05 and 1.00 (1 = the exact target)."""
    base = mean_strengths(pipe, lambda alphas: {})[0]
    assert 0.9 < base[0] < 1.15 and 0.9 < base[1] < 1.1, f"strengths of (darker, larger) at alpha 0: {base}"


def test_gstlora_slider_moves_both_edits_of_the_prompt(pipe):
    pipe.load_gstlora(TOY / "sliders" / "gstlora")
    try:
        strengths = mean_strengths(pipe, lambda alphas: {"slider_alpha": alphas})
    finally:
        pipe.unload_sliders()
    assert_runs_from_exaggerated_to_suppressed(strengths[:, 0], f"GSTLoRA, '{DARKER.instruction}'")
    assert_runs_from_exaggerated_to_suppressed(strengths[:, 1], f"GSTLoRA, '{LARGER.instruction}'")


@pytest.mark.parametrize("which", [0, 1])
def test_each_stlora_slider_moves_its_own_edit_and_leaves_the_other(pipe, which):
    zeros = [0.0] * len(ALPHAS)
    pipe.load_stlora(TOY / "sliders" / "stlora")
    try:
        strengths = mean_strengths(pipe, lambda alphas: {"subprompts_list": SUBPROMPTS,
                                                         "slider_alpha_list": [alphas, zeros][::1 - 2 * which]})
    finally:
        pipe.unload_sliders()
    assert_runs_from_exaggerated_to_suppressed(strengths[:, which], f"STLoRA slider '{SUBPROMPTS[which]}'")
    other = strengths[:, 1 - which]  # measured: it moves by at most 0.058
    assert np.abs(other - other[ALPHAS.index(0.0)]).max() < 0.15, f"the other edit drifted: {other}"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, Path]:
    """`python infer.py` with no arguments, run once in an empty folder: (that folder, the sweep it wrote)."""
    folder = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)  # the demo writes to outputs/sweep under the working folder
        return folder, infer.main([])


def test_python_infer_with_no_arguments_runs_the_embedded_demo(demo):
    folder, out = demo
    assert out == Path("outputs/sweep")
    grid = Image.open(folder / out / "grid.png")
    assert grid.width > 5 * 128 and grid.height > 5 * 128  # a 5 x 5 grid over both sliders
    assert Image.open(folder / out / "sweep.gif").n_frames > 1


def test_the_demo_grid_is_no_less_faithful_than_measured(demo):
    """Each cell of the default demo's grid against the ideal render of the two strengths read from it
    (slideredit/toy/fidelity.py). Measured on the shipped model with issue 23's decoder phase (float32;
    benchmarks/RESULTS.md, toy decoder phase): image error median 3.13, max 8.20 (darker -1, larger -1;
    before the decoder phase 4.71 and 10.11); core-colour error of the worse shape median 57.4, max 85.5
    (63.3 and 97.6: the circle, which no edit of the prompt recolours, is 42-86 off in every cell, it turns
    teal; the square 4-82, 36-82 at darker -0.5 and -1 where it turns dark green); centroids at most 0.48 px
    off; the square, which nothing resizes, 3.21 px too large at most (darker -1). Regression guards, 5%
    (0.1 px for positions, 0.2 px for sizes) above those; the issue's goals (image error <= 3, core colour
    <= 12 in every cell) need a base model that leaves untouched shapes alone."""
    folder, out = demo
    example = json.loads((TOY / "example.json").read_text())
    scene = scene_from_dict(example["scene"])
    cells = json.loads((folder / out / "sweep.json").read_text())["cells"]
    assert len(cells) == 25
    readings = [read_fidelity(Image.open(folder / out / cell["image"]), scene, [DARKER, LARGER]) for cell in cells]
    image, color = [r.image_error for r in readings], [r.color_error for r in readings]
    assert np.median(image) < 3.13 * 1.05 and max(image) < 8.20 * 1.05, f"image errors per cell: {image}"
    assert np.median(color) < 57.4 * 1.05 and max(color) < 85.5 * 1.05, f"core-colour errors per cell: {color}"
    assert max(r.position_error for r in readings) < 0.48 + 0.1
    assert max(abs(r.shapes["square"].size_error) for r in readings) < 3.21 + 0.2


def test_the_recipes_demo_reading_is_the_demos(demo, pipe):
    """demo_grid_fidelity (what the recipe writes into the model card and toy_sliders.py prints) renders the
    same 25 cells as `python infer.py` and reads them the same way: each cell's strengths and errors match
    the reading of infer.py's own PNGs (up to the last bits: infer.py renders the grid in batches)."""
    folder, out = demo
    scene = scene_from_dict(json.loads((TOY / "example.json").read_text())["scene"])
    cells = {tuple(cell["alphas"]): cell["image"] for cell in json.loads((folder / out / "sweep.json").read_text())["cells"]}
    pipe.load_stlora(TOY / "sliders" / "stlora")
    try:
        recipe = demo_grid_fidelity(pipe, TOY)
    finally:
        pipe.unload_sliders()
    assert [tuple(cell["alphas"]) for cell in recipe["cells"]] == [(a, b) for a in DEMO_ALPHAS for b in DEMO_ALPHAS]
    for cell in recipe["cells"]:
        reading = read_fidelity(Image.open(folder / out / cells[tuple(cell["alphas"])]), scene, [DARKER, LARGER])
        assert np.allclose(cell["strengths"], reading.strengths, atol=0.01), cell
        assert abs(cell["image_error"] - reading.image_error) < 0.05, cell
        assert all(abs(cell["color_error"][k] - reading.shapes[k].color_error) < 0.5 for k in ("square", "circle")), cell
    assert recipe["cells_meeting_goals"] == sum(c["image_error"] <= 3 and max(c["color_error"].values()) <= 12
                                                for c in recipe["cells"])
