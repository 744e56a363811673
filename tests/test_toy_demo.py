"""The shipped toy model and its sliders (assets/toy-kontext): the embedded demo works, and the edit
strength measured by the toy world's attribute readers moves monotonically with each slider."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import infer
from slideredit.pipelines import SliderEditFluxKontextPipeline
from slideredit.toy.shapes import Edit, edit_strength, make_example, render_image

TOY = Path(__file__).resolve().parents[1] / "assets" / "toy-kontext"
COLOR, SIZE = Edit("square", "red"), Edit("circle", "larger")
STEPS = 12


@pytest.fixture(scope="module")
def pipe():
    pipe = SliderEditFluxKontextPipeline.from_pretrained(TOY, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def held_out_scenes(n: int) -> list:
    """Scenes from a stream no training used, whose square is far from red (so the edit is visible)."""
    out, index = [], 0
    while len(out) < n:
        source = make_example(50_000, index, num_edits=0).source
        index += 1
        if np.linalg.norm(np.subtract(source.square.color, COLOR.apply(source).square.color)) > 60:
            out.append(source)
    return out


def mean_strengths(pipe, prompt: str, edit: Edit, sliders_for, alphas, scenes) -> list[float]:
    strengths = []
    for alpha in alphas:
        values = [edit_strength(pipe(image=render_image(s), prompt=prompt, num_inference_steps=STEPS,
                                     generator=torch.Generator().manual_seed(i), **sliders_for(alpha)).images[0], s, edit)
                  for i, s in enumerate(scenes)]
        strengths.append(float(np.mean(values)))
    return strengths


def assert_falls(strengths: list[float], alphas: list[float], drop: float, what: str) -> None:
    """Alpha 0 is the base edit, 1 suppresses it, < 0 exaggerates: the strength falls as alpha grows
    (up to reading noise of 0.05), by at least `drop` over the sweep."""
    assert all(b <= a + 0.05 for a, b in zip(strengths, strengths[1:])), f"{what}: {strengths} over {alphas}"
    assert strengths[0] - strengths[-1] > drop, f"{what}: the slider barely moves the edit: {strengths}"


def test_gstlora_slider_suppresses_monotonically(pipe):
    """Measured (benchmarks/toy_sliders.py): the colour edit saturates below alpha -0.5, so the sweep
    starts there."""
    alphas = [-0.5, 0.0, 0.25, 0.5, 1.0]
    pipe.load_gstlora(TOY / "sliders" / "gstlora")
    try:
        strengths = mean_strengths(pipe, COLOR.instruction, COLOR, lambda a: {"slider_alpha": a}, alphas,
                                   held_out_scenes(3))
    finally:
        pipe.unload_sliders()
    assert_falls(strengths, alphas, 0.5, "GSTLoRA on 'make the square red'")


@pytest.mark.parametrize("which, alphas, drop", [(0, [0.0, 0.25, 0.5, 1.0], 0.25),
                                                 (1, [-1.0, -0.5, 0.0, 0.5, 1.0], 1.0)])
def test_stlora_sliders_move_their_own_edit_monotonically(pipe, which, alphas, drop):
    prompt = f"{COLOR.instruction} and {SIZE.instruction}"
    subprompts = [COLOR.instruction, SIZE.instruction]
    pipe.load_stlora(TOY / "sliders" / "stlora")
    try:
        sliders = lambda a: {"subprompts_list": subprompts, "slider_alpha_list": [a, 0.0] if which == 0 else [0.0, a]}
        strengths = mean_strengths(pipe, prompt, (COLOR, SIZE)[which], sliders, alphas, held_out_scenes(3))
    finally:
        pipe.unload_sliders()
    assert_falls(strengths, alphas, drop, f"STLoRA slider '{subprompts[which]}'")


def test_python_infer_with_no_arguments_runs_the_embedded_demo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo writes to outputs/sweep under the working folder
    out = infer.main([])
    assert out == Path("outputs/sweep")
    grid = Image.open(out / "grid.png")
    assert grid.width > 5 * 128 and grid.height > 5 * 128  # a 5 x 5 grid over both sliders
    assert Image.open(out / "sweep.gif").n_frames > 1
