"""The toy world's fidelity reader: an ideal render reads as faithful, and hand-made faults (a colour leak, a
moved shape, a shape resized by nobody's edit) read as exactly what was done to the picture."""
import math

import numpy as np
import pytest
from PIL import Image

import eval as eval_script
from slideredit.evaluation import TOY_FIDELITY_TITLES, ToyFidelity, read_source_scene
from slideredit.toy.fidelity import INTERIOR_MARGIN, edit_at_strength, ideal_scene, interior, read_fidelity
from slideredit.toy.shapes import IMAGE_SIZE, SHAPES, Edit, Shape, coverage, edit_strength, make_example, render
from test_eval_script import make_toy_sweep, read_outputs

DARKER, LARGER, BLUE = Edit("square", "darker"), Edit("circle", "larger"), Edit("circle", "blue")
# The readers' own error on exact renders, measured on the scenes below: a read strength is 0.02 off at most
# (the size reader's dead zone, about 0.1 px per edge), so the ideal drawn from it is up to 0.12 mean |RGB|
# off and a size 0.18 px off; a colour drawn at a read strength rounds one step the other way in up to two
# channels (sqrt 2); centroids read the same to the last digit.
STRENGTH_TOL, IMAGE_TOL, COLOR_TOL, POSITION_TOL, SIZE_TOL = 0.03, 0.15, math.sqrt(2) + 1e-9, 1e-6, 0.25


def held_out(index: int):
    return make_example(50_000, index, num_edits=0).source


def assert_faithful(reading, strengths) -> None:
    np.testing.assert_allclose(reading.strengths, strengths, atol=STRENGTH_TOL)
    assert reading.image_error < IMAGE_TOL
    assert reading.color_error <= COLOR_TOL
    assert reading.position_error < POSITION_TOL
    assert reading.size_error < SIZE_TOL


# ---------------------------------------------------------------------------------------------------
# The ideal scene
# ---------------------------------------------------------------------------------------------------

def test_edit_at_strength_walks_the_segment_the_readers_project_on():
    scene = held_out(0).with_shape("square", color=(200, 40, 40)).with_shape("circle", size=11.0)
    assert edit_at_strength(scene, DARKER, 0.5).square.color == (150, 30, 30)  # halfway to (100, 20, 20)
    assert edit_at_strength(scene, DARKER, 1.5).square.color == (50, 10, 10)  # exaggerated: past the target
    assert edit_at_strength(scene, DARKER, -1.0).square.color == (255, 60, 60)  # 300 clipped to 255
    assert edit_at_strength(scene, LARGER, 1.5).circle.size == 20.0  # 11 + 1.5 * 6
    assert edit_at_strength(scene, LARGER, 0.0) == scene
    # A runaway strength still gives a scene: the largest circle that fits in its half, or a speck.
    cx, cy = scene.circle.center
    assert edit_at_strength(scene, LARGER, 50.0).circle.size == min(cx - 64, 128 - cx, cy, 128 - cy)
    assert edit_at_strength(scene, LARGER, -50.0).circle.size == 0.5
    for edit in (DARKER, LARGER, BLUE):  # and the readers read each strength back
        for strength in (0.0, 0.4, 1.0):
            image = render(edit_at_strength(scene, edit, strength))
            assert edit_strength(image, scene, edit) == pytest.approx(strength, abs=STRENGTH_TOL)


def test_ideal_scene_carries_out_every_edit_and_refuses_a_mismatch():
    source = held_out(1)
    ideal = ideal_scene(source, [DARKER, LARGER], [0.5, 2.0])
    assert ideal == edit_at_strength(edit_at_strength(source, DARKER, 0.5), LARGER, 2.0)
    with pytest.raises(ValueError, match="one strength per edit: 2 edits, 1 strengths"):
        ideal_scene(source, [DARKER, LARGER], [0.5])
    with pytest.raises(ValueError, match="change the same attribute twice"):
        ideal_scene(source, [DARKER, Edit("square", "red")], [1.0, 1.0])


def test_the_interior_keeps_off_the_anti_aliased_edge():
    scene = held_out(2)
    for kind in SHAPES:
        shape = scene.shape(kind)
        weights = interior(shape)
        assert weights.sum() > 0 and np.all(coverage(shape)[weights > 0] == 1.0)  # only fully covered pixels
        # ...and over INTERIOR_MARGIN - sqrt(2) px inside: the shape 1.5 px smaller (all round) still covers them.
        inset = INTERIOR_MARGIN - 1.5
        inner = Shape(kind, shape.color, shape.size - (2 * inset if kind == "square" else inset), shape.center)
        assert np.all(coverage(inner)[weights > 0] == 1.0)
    tiny = Shape("circle", (0, 0, 0), 2.0, scene.circle.center)  # under 2 margins across
    assert interior(tiny).sum() > 0 and np.all(coverage(tiny)[interior(tiny) > 0] == 1.0)


# ---------------------------------------------------------------------------------------------------
# Ideal renders read as faithful
# ---------------------------------------------------------------------------------------------------

def test_an_unedited_render_reads_as_exactly_zero_error():
    source = held_out(3)
    reading = read_fidelity(render(source), source, [DARKER, BLUE])  # colour edits: strengths read exactly 0
    assert reading.strengths == (0.0, 0.0) and reading.ideal == source
    assert reading.image_error == 0.0 and reading.color_error == 0.0 and reading.position_error == 0.0


@pytest.mark.parametrize("index", range(4))
def test_ideal_renders_of_the_demo_edits_read_back_their_strengths_and_no_error(index):
    source = held_out(index)
    for darker in (0.0, 0.5, 1.0, 1.5):
        for larger in (-0.5, 0.0, 1.0, 1.5):
            truth = ideal_scene(source, [DARKER, LARGER], [darker, larger])
            assert_faithful(read_fidelity(Image.fromarray(render(truth)), source, [DARKER, LARGER]), [darker, larger])


def test_ideal_renders_of_any_two_edits_read_back_their_strengths_and_no_error():
    for index in range(12):  # colours, brightness and sizes of either shape, within their segments
        example = make_example(7, index, num_edits=2)
        for strength in (0.0, 0.3, 1.0):
            truth = ideal_scene(example.source, example.edits, [strength, strength])
            assert_faithful(read_fidelity(render(truth), example.source, example.edits), [strength, strength])


# ---------------------------------------------------------------------------------------------------
# Hand-made faults read as what was done
# ---------------------------------------------------------------------------------------------------

def leaked(scene, kind: str, offset) -> np.ndarray:
    """The render with the shape's colour moved by `offset`: every pixel by its covered fraction of it."""
    return render(scene).astype(np.float64) + coverage(scene.shape(kind))[..., None] * np.asarray(offset, np.float64)


def test_a_colour_leak_on_an_untouched_shape_reads_as_its_offset():
    source = held_out(4).with_shape("circle", color=(40, 160, 60))
    truth = ideal_scene(source, [DARKER], [1.0])
    offset = (12.0, -30.0, 20.0)  # green towards teal: the demo's leak
    reading = read_fidelity(leaked(truth, "circle", offset), source, [DARKER])
    assert reading.strengths == (1.0,) and reading.ideal == truth  # invisible to the strength reader
    assert reading.shapes["circle"].color_error == pytest.approx(math.sqrt(12 ** 2 + 30 ** 2 + 20 ** 2), rel=1e-12)
    assert reading.shapes["square"].color_error == 0.0
    # Every circle pixel moved by its covered fraction of |12| + |30| + |20| per image channel.
    expected = coverage(truth.circle).sum() * (12 + 30 + 20) / (3 * IMAGE_SIZE ** 2)
    assert reading.image_error == pytest.approx(expected, rel=1e-9)
    assert reading.shapes["circle"].position_error < 0.01 and abs(reading.shapes["circle"].size_error) < 0.01


def test_a_leak_off_the_edits_axis_reads_as_colour_error_along_it_as_strength():
    """"darker" moves the colour towards black, along -colour; the square turning dark GREEN is off that axis."""
    source = held_out(5).with_shape("square", color=(200, 40, 40))
    truth = ideal_scene(source, [DARKER], [1.0])  # (100, 20, 20)
    across = (0.0, 20.0, -20.0)  # orthogonal to (100, 20, 20): the read strength stays 1
    reading = read_fidelity(leaked(truth, "square", across), source, [DARKER])
    assert reading.strengths[0] == pytest.approx(1.0, abs=1e-12)
    assert reading.shapes["square"].color_error == pytest.approx(math.hypot(20, 20), rel=1e-9)
    along = (-10.0, -2.0, -2.0)  # a tenth further towards black: a stronger edit, drawn faithfully
    reading = read_fidelity(leaked(truth, "square", along), source, [DARKER])
    assert reading.strengths[0] == pytest.approx(1.1, abs=1e-12)
    assert reading.color_error == 0.0 and reading.image_error < IMAGE_TOL


@pytest.mark.parametrize("kind, shift", [("circle", (1.25, -0.75)), ("square", (-0.5, 1.0))])
def test_a_moved_shape_reads_as_its_offset(kind, shift):
    source = held_out(6)
    truth = ideal_scene(source, [DARKER, LARGER], [1.0, 1.0])
    (x, y) = truth.shape(kind).center
    moved = truth.with_shape(kind, center=(x + shift[0], y + shift[1]))
    reading = read_fidelity(render(moved), source, [DARKER, LARGER])
    np.testing.assert_allclose(reading.shapes[kind].offset, shift, atol=0.02)
    other = [k for k in SHAPES if k != kind][0]
    assert reading.shapes[other].position_error < POSITION_TOL
    assert reading.color_error <= COLOR_TOL  # a move within the interior's margin leaves its colour alone
    np.testing.assert_allclose(reading.strengths, [1.0, 1.0], atol=STRENGTH_TOL)  # sizes read the same
    # The image error is the move's: the ideal is the unmoved scene (up to the readers' own error).
    moved_error = np.abs(render(moved).astype(np.float64) - render(truth)).mean()
    assert moved_error > 0.5 and reading.image_error == pytest.approx(moved_error, abs=IMAGE_TOL)


def test_a_shape_no_edit_resizes_reads_as_its_size_change():
    source = held_out(7)
    truth = ideal_scene(source, [DARKER], [1.0])
    grown = truth.with_shape("circle", size=truth.circle.size + 1.5)
    reading = read_fidelity(render(grown), source, [DARKER])
    assert reading.shapes["circle"].size_error == pytest.approx(1.5, abs=0.05)
    assert abs(reading.shapes["square"].size_error) < SIZE_TOL and reading.shapes["circle"].color_error == 0.0


# ---------------------------------------------------------------------------------------------------
# eval.py's toy scorer
# ---------------------------------------------------------------------------------------------------

def test_toy_fidelity_scores_each_image_of_a_sweep(tmp_path):
    """The exact renders of a toy sweep read as faithful (the source scene is read from the source image:
    its sizes are 0.1 px off, hence a floor a little over the exact scene's); a cell with a leaked circle
    stands out in toy_color_error by the leak's length, in metrics.csv and on the explorer page."""
    folder = tmp_path / "toy"
    make_toy_sweep(folder, "/no/such/toy-kontext")
    source = Image.open(folder / "source.png")
    leaky = folder / "cells" / "4.png"  # alphas (0, 0)
    pixels = np.asarray(Image.open(leaky).convert("RGB"), np.float64)
    offset = np.array([0.0, 24.0, -32.0])  # |offset| = 40
    circle = coverage(read_source_scene(Image.open(leaky)).circle)[..., None]  # this cell's (larger) circle
    leaked_image = Image.fromarray(np.clip(np.round(pixels + circle * offset), 0, 255).astype(np.uint8))
    leaked_image.save(leaky)

    out = tmp_path / "out"
    eval_script.main(["--sweep", str(folder), "--scorer", "toy", "--out", str(out)])
    rows, _, _ = read_outputs(out)
    for row in rows:
        color = float(row["toy_color_error"])
        if row["image"].endswith("cells/4.png"):
            assert color == pytest.approx(40.0, abs=1.0)
        else:
            assert color <= COLOR_TOL
            assert float(row["toy_image_error"]) < 0.3 and float(row["toy_position_error"]) < 0.05
            assert float(row["toy_size_error"]) < 0.3

    scores = ToyFidelity()([leaked_image, source], source, "make the square red and make the circle larger")
    assert list(scores) == list(TOY_FIDELITY_TITLES)
    assert scores["toy_color_error"].tolist() == pytest.approx([40.0, 0.0], abs=1.0)
    with pytest.raises(ValueError, match=r"images\[0\] is 64x64; the toy readers need 128x128"):
        ToyFidelity()([Image.new("RGB", (64, 64))], source, "make the square red")
