"""The toy editing world: deterministic generation, exact renders, edits that touch only what they say,
and attribute readers that read back what was rendered."""
import json
import math

import numpy as np
import pytest
from PIL import Image

from slideredit.toy.shapes import (BACKGROUND, COLORS, DEAD_ZONE, HALF, IMAGE_SIZE, INDEPENDENT_EDITS, NEUTRAL_PROMPT,
                                   SINGLE_EDITS, SIZE_STEP, Edit, Scene, Shape, ToyExample, apply_edits, coverage,
                                   edit_strength, join_instructions, make_example, nearest_color, parse_instruction,
                                   random_edits, random_scene, read_scene, read_shape, render, scene_from_dict,
                                   toy_examples, write_slider_training_folder)

EXAMPLES = list(toy_examples(24, seed=3))


def test_generator_is_deterministic_from_the_seed():
    again = list(toy_examples(24, seed=3))
    assert again == EXAMPLES
    assert all(np.array_equal(render(a.target), render(b.target)) for a, b in zip(again[:5], EXAMPLES[:5]))
    other = list(toy_examples(24, seed=4))
    assert sum(a != b for a, b in zip(other, EXAMPLES)) == 24
    # Example i does not depend on how many examples are drawn before it.
    assert make_example(3, 17) == EXAMPLES[17]


def test_generator_covers_every_edit_count_and_kind():
    counts = {len(e.edits) for e in toy_examples(200, seed=0)}
    assert counts == {0, 1, 2, 3}
    seen = {edit for e in toy_examples(400, seed=0) for edit in e.edits}
    assert seen == set(SINGLE_EDITS)


def test_instructions_join_single_edits_with_and():
    example = next(e for e in EXAMPLES if len(e.edits) == 2)
    a, b = (edit.instruction for edit in example.edits)
    assert example.instruction == f"{a} and {b}"
    assert join_instructions(["make the square red", "make the circle larger"]) == \
        "make the square red and make the circle larger"
    assert join_instructions([]) == NEUTRAL_PROMPT
    for e in EXAMPLES:
        assert parse_instruction(e.instruction) == e.edits
    assert Edit("circle", "larger").instruction == "make the circle larger"
    with pytest.raises(ValueError, match="not a toy edit"):
        parse_instruction("make the square red and make the sky pink")


def test_edits_are_on_distinct_attributes_and_change_the_colour():
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = random_scene(rng)
        edits = random_edits(rng, scene, 4)
        assert len({(e.shape, e.slot) for e in edits}) == 4
        for e in edits:
            if e.attribute == "color":
                assert e.value != nearest_color(scene.shape(e.shape).color)
    with pytest.raises(ValueError, match="same attribute twice"):
        apply_edits(EXAMPLES[0].source, [Edit("square", "red"), Edit("square", "blue")])


def test_every_single_edit_applies_to_every_source_scene():
    rng = np.random.default_rng(1)
    for _ in range(100):
        scene = random_scene(rng)
        for edit in SINGLE_EDITS:
            edit.apply(scene)  # Scene validates that both shapes still fit their halves


def test_target_differs_from_source_only_where_the_instruction_says():
    for example in EXAMPLES:
        source, target = render(example.source), render(example.target)
        changed = np.any(source != target, axis=-1)
        if not example.edits:
            assert not changed.any()
        for kind in ("square", "circle"):
            edits = [e for e in example.edits if e.shape == kind]
            lo, hi = HALF[kind]
            half_changed = changed[:, lo:hi]
            if not edits:
                assert not half_changed.any(), f"{example.instruction!r} changed the {kind}"
                continue
            assert half_changed.any()
            # Only pixels that one of the two shapes covers may change.
            covered = (coverage(example.source.shape(kind)) > 0) | (coverage(example.target.shape(kind)) > 0)
            assert not (changed & ~covered)[:, lo:hi].any()
            # A colour or brightness edit keeps the outline: unchanged area; a size-only edit keeps the colour.
            before, after = example.source.shape(kind), example.target.shape(kind)
            slots = {e.slot for e in edits}
            assert (before.size != after.size) == ("size" in slots)
            assert (before.color != after.color) == ("color" in slots)


def test_square_coverage_is_exact():
    # Side 2.5 centred on a pixel corner: 2x2 pixels fully covered, a ring of quarter-covered edges.
    shape = Shape("square", (200, 40, 40), 2.5, (10.0, 10.0))
    cov = coverage(shape)
    assert cov.sum() == pytest.approx(2.5 ** 2, abs=1e-12)
    assert cov[9, 9] == 1.0 and cov[8, 9] == 0.25 and cov[8, 8] == 0.0625 and cov[7, 9] == 0.0


def test_circle_coverage_matches_its_area():
    for r in (5.0, 11.3, 20.0):
        shape = Shape("circle", (40, 70, 200), r, (96.0, 64.0))
        assert coverage(shape).sum() == pytest.approx(math.pi * r * r, rel=2e-3)


def test_render_blends_colours_by_coverage():
    scene = EXAMPLES[0].source
    image = render(scene)
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.dtype == np.uint8
    assert tuple(image[0, 0]) == BACKGROUND
    x, y = scene.square.center
    assert tuple(image[int(y), int(x)]) == scene.square.color
    cov = coverage(scene.circle)
    i, j = np.argwhere((cov > 0.3) & (cov < 0.7))[0]
    expected = np.round(np.asarray(BACKGROUND) * (1 - cov[i, j]) + np.asarray(scene.circle.color) * cov[i, j])
    assert np.array_equal(image[i, j], expected)


def test_scenes_that_leave_their_half_are_rejected():
    scene = EXAMPLES[0].source
    with pytest.raises(ValueError, match="does not fit in its half"):
        scene.with_shape("square", size=70.0)
    with pytest.raises(ValueError, match="does not fit in its half"):
        scene.with_shape("circle", center=(60.0, 64.0))
    with pytest.raises(ValueError, match="no such edit"):
        Edit("triangle", "red")


def test_readers_recover_the_rendered_attributes():
    for example in EXAMPLES:
        for scene in (example.source, example.target):
            image = render(scene)
            for kind in ("square", "circle"):
                shape = scene.shape(kind)
                exact = read_shape(image, kind, shape.center, dead_zone=0.0)
                assert exact.color == tuple(float(c) for c in shape.color)
                # Only the 8-bit rounding of the anti-aliased edge pixels separates the two.
                assert exact.area == pytest.approx(coverage(shape).sum(), abs=0.3)
                assert exact.centroid == pytest.approx(shape.center, abs=0.01)
                # The circle's coverage is itself a supersampled estimate of pi r^2.
                assert exact.size == pytest.approx(shape.size, abs=0.03)
                default = read_scene(image, scene)[kind]
                # The dead zone costs a straight edge up to DEAD_ZONE pixel (see shape_weights).
                assert default.size == pytest.approx(shape.size, abs=2 * DEAD_ZONE + 0.01)


def test_readers_ignore_background_noise_and_shifts():
    rng = np.random.default_rng(0)
    for example in EXAMPLES[:10]:
        scene = example.source
        noisy = render(scene).astype(np.float64) + rng.normal(0, 3, (IMAGE_SIZE, IMAGE_SIZE, 3)) - 6
        noisy = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
        for kind in ("square", "circle"):
            reading = read_shape(noisy, kind, scene.shape(kind).center)
            assert reading.size == pytest.approx(scene.shape(kind).size, abs=0.3)
            shifted = np.clip(np.subtract(scene.shape(kind).color, 6), 0, 255)
            assert np.linalg.norm(np.subtract(reading.color, shifted)) < 3


def test_readers_accept_pil_images_and_reject_other_sizes():
    scene = EXAMPLES[1].source
    pil = Image.fromarray(render(scene))
    assert read_scene(pil, scene) == read_scene(render(scene), scene)
    with pytest.raises(ValueError, match="128x128"):
        read_shape(np.zeros((64, 64, 3), np.uint8), "square", (32.0, 32.0))


def test_a_missing_shape_reads_as_zero_area():
    blank = np.broadcast_to(np.asarray(BACKGROUND, np.uint8), (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    reading = read_shape(blank, "circle", (96.0, 64.0))
    assert reading.area == 0.0 and reading.size == 0.0


def test_edit_strength_is_zero_on_the_source_and_one_on_the_target():
    for example in EXAMPLES:
        for edit in example.edits:
            assert edit_strength(render(example.source), example.source, edit) == pytest.approx(0.0, abs=0.03)
            assert edit_strength(render(example.target), example.source, edit) == pytest.approx(1.0, abs=0.03)


def test_edit_strength_is_continuous_in_the_attribute():
    scene = EXAMPLES[0].source.with_shape("square", color=COLORS["blue"]).with_shape("circle", size=12.0)
    redden, grow = Edit("square", "red"), Edit("circle", "larger")
    for fraction in (-0.2, 0.25, 0.5, 1.2):  # colours that stay within 0..255
        blend = np.round(np.add(COLORS["blue"], fraction * np.subtract(COLORS["red"], COLORS["blue"])))
        halfway = scene.with_shape("square", color=tuple(int(c) for c in np.clip(blend, 0, 255)))
        assert edit_strength(render(halfway), scene, redden) == pytest.approx(fraction, abs=0.02)
        bigger = scene.with_shape("circle", size=12.0 + fraction * SIZE_STEP["circle"])
        assert edit_strength(render(bigger), scene, grow) == pytest.approx(fraction, abs=0.03)


def test_redness_orders_the_palette():
    scene = EXAMPLES[0].source
    readings = {name: read_shape(render(scene.with_shape("square", color=rgb)), "square", scene.square.center)
                for name, rgb in COLORS.items()}
    assert readings["red"].redness == pytest.approx((200 - 40) / 255)
    assert readings["red"].redness > readings["yellow"].redness > 0 > readings["green"].redness
    assert readings["blue"].redness < 0


def test_independent_edits_never_conflict():
    assert len({(e.shape, e.slot) for e in INDEPENDENT_EDITS}) == len(INDEPENDENT_EDITS)
    # The demo's two edits lead the list, both continuous; one colour edit stays, suppression-only.
    assert [e.instruction for e in INDEPENDENT_EDITS[:2]] == ["make the square darker", "make the circle larger"]
    assert all(e.continuous for e in INDEPENDENT_EDITS[:2])
    assert [e.attribute for e in INDEPENDENT_EDITS if not e.continuous] == ["color"]


def test_brightness_edits_scale_towards_black_and_white_by_hand():
    scene = EXAMPLES[0].source.with_shape("square", color=(200, 41, 40))
    assert Edit("square", "darker").apply(scene).square.color == (100, 20, 20)  # x 0.5, 20.5 rounds to even
    assert Edit("square", "lighter").apply(scene).square.color == (228, 148, 148)  # halfway to 255
    assert Edit("square", "darker").apply(scene).square.size == scene.square.size
    with pytest.raises(ValueError, match="same attribute twice"):
        apply_edits(scene, [Edit("square", "darker"), Edit("square", "red")])
    apply_edits(scene, [Edit("square", "darker"), Edit("square", "larger"), Edit("circle", "lighter")])


def test_brightness_strength_reads_exaggeration_and_reversal():
    """"darker" is continuous both ways: shades past the target read above 1, lighter ones below 0."""
    scene = EXAMPLES[0].source.with_shape("square", color=(200, 160, 80))
    darker = Edit("square", "darker")
    for fraction in (-0.3, 0.5, 1.0, 1.4):
        shade = tuple(int(round(c * (1 - 0.5 * fraction))) for c in scene.square.color)
        assert edit_strength(render(scene.with_shape("square", color=shade)), scene, darker) == \
            pytest.approx(fraction, abs=0.02)


def test_slider_training_folder(tmp_path):
    out = write_slider_training_folder(tmp_path / "data", 6, seed=5)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    prompts = json.loads((out / "single_edit_prompts.json").read_text())
    assert prompts == [e.instruction for e in INDEPENDENT_EDITS]
    for row in rows:
        assert row["instruction"] == " and ".join(row["edits"]) and set(row["edits"]) <= set(prompts)
        scene = scene_from_dict(row["scene"])
        assert np.array_equal(np.asarray(Image.open(out / row["file_name"])), render(scene))
    again = write_slider_training_folder(tmp_path / "again", 6, seed=5)
    assert (again / "metadata.jsonl").read_text() == (out / "metadata.jsonl").read_text()
    # Any edit list works; two edits of one instruction never touch the same attribute.
    every = write_slider_training_folder(tmp_path / "every", 20, seed=5, edits=SINGLE_EDITS)
    for line in (every / "metadata.jsonl").read_text().splitlines():
        edits = parse_instruction(json.loads(line)["instruction"])
        assert len({(e.shape, e.slot) for e in edits}) == len(edits)
    with pytest.raises(ValueError, match="not a toy scene"):
        scene_from_dict({"square": {}})


def test_toy_example_properties():
    example = ToyExample(EXAMPLES[0].source, (Edit("circle", "smaller"),))
    assert example.instructions == ["make the circle smaller"]
    assert example.target.circle.size == example.source.circle.size - SIZE_STEP["circle"]
    assert isinstance(example.target, Scene)
