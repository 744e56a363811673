"""slideredit.grids: saved images take the format of their extension; the sweep picture puts every cell,
enlarged, where its alphas say, beside the source, with the base edit framed; GIF walks move one notch
at a time."""
import numpy as np
import pytest
from PIL import Image

from slideredit.grids import (BASE_EDIT_FRAME, FRAME_WIDTH, SliderAxis, cell_scale, enlarge, image_format,
                              motion_order, save_image, sweep_grid, with_caption)


@pytest.fixture()
def picture():
    """A smooth RGBA picture (JPEG's error on it says something about the quality setting)."""
    y, x = np.mgrid[0:20, 0:30]
    channels = [8 * x, 12 * y, 4 * (x + y), np.full_like(x, 200)]
    return Image.fromarray(np.stack(channels, axis=-1).astype(np.uint8), "RGBA")


@pytest.mark.parametrize("name, fmt", [("a.png", "PNG"), ("a.PNG", "PNG"), ("a.jpg", "JPEG"), ("a.jpeg", "JPEG"),
                                       ("a.JPG", "JPEG"), ("a.webp", "WEBP")])
def test_the_extension_decides_the_format(tmp_path, picture, name, fmt):
    path = save_image(picture, tmp_path / name)
    with Image.open(path) as saved:
        assert saved.format == fmt and saved.size == (30, 20)
        if fmt == "JPEG":
            assert saved.mode == "RGB"  # JPEG has no alpha channel
            error = np.abs(np.asarray(saved, dtype=float) - np.asarray(picture.convert("RGB"), dtype=float)).mean()
            assert error < 2  # quality 95; Pillow's default 75 is worse
        if fmt == "PNG":
            assert np.array_equal(np.asarray(saved), np.asarray(picture))  # lossless


@pytest.mark.parametrize("name", ["a.bmp", "a", "a.gif.txt"])
def test_other_extensions_are_a_clear_error(tmp_path, picture, name):
    with pytest.raises(ValueError, match="cannot tell the image format"):
        save_image(picture, tmp_path / name)
    with pytest.raises(ValueError, match=r"\.png, \.jpg, \.jpeg, \.webp"):
        image_format(name)
    assert list(tmp_path.iterdir()) == []


def flat(rgb, size=(40, 32)) -> Image.Image:
    """A cell of one colour with a marked corner pixel (so an upside-down or shifted paste shows)."""
    pixels = np.full((size[1], size[0], 3), rgb, np.uint8)
    pixels[0, 0] = (255 - rgb[0], 0, 0)
    return Image.fromarray(pixels)


def test_cell_scale_enlarges_small_images_by_an_integer_factor():
    assert cell_scale((128, 128)) == 2 and cell_scale((40, 32)) == 7 and cell_scale((1024, 768)) == 1
    image = flat((10, 20, 30))
    big = np.asarray(enlarge(image, 3))
    assert big.shape == (96, 120, 3) and (big[:3, :3] == np.asarray(image)[0, 0]).all()  # nearest neighbour


@pytest.mark.parametrize("alphas", [[-1.0, 0.0, 1.0], [1.0, -1.0, 0.0]])
def test_two_slider_grid_places_every_cell_by_ascending_alpha(alphas):
    cells = {(a, b): flat((int(100 + 60 * a), int(100 + 60 * b), 7)) for a in alphas for b in alphas}
    source = flat((1, 2, 3))
    picture, boxes = sweep_grid(source, cells, SliderAxis("slider 2", alphas), SliderAxis("slider 1", alphas),
                                title="prompt")
    pixels, scale = np.asarray(picture), cell_scale(source.size)
    for key, (left, top, right, bottom) in boxes.items():
        inside = pixels[top + FRAME_WIDTH:bottom - FRAME_WIDTH, left + FRAME_WIDTH:right - FRAME_WIDTH]
        want = np.asarray(enlarge(cells[key], scale))[FRAME_WIDTH:-FRAME_WIDTH, FRAME_WIDTH:-FRAME_WIDTH]
        assert np.array_equal(inside, want), key
    # Ascending alpha: left to right, top to bottom, whatever order the sweep listed them in.
    lefts = {b: boxes[(-1.0, b)][0] for b in (-1.0, 0.0, 1.0)}
    tops = {a: boxes[(a, -1.0)][1] for a in (-1.0, 0.0, 1.0)}
    assert lefts[-1.0] < lefts[0.0] < lefts[1.0] and tops[-1.0] < tops[0.0] < tops[1.0]
    # The base edit is framed; its neighbours are not.
    left, top, right, bottom = boxes[(0.0, 0.0)]
    assert tuple(pixels[top, (left + right) // 2]) == BASE_EDIT_FRAME
    assert tuple(pixels[bottom - 1, left + 1]) == BASE_EDIT_FRAME
    l1, t1, r1, b1 = boxes[(0.0, 1.0)]
    assert np.array_equal(pixels[t1 + 1, l1 + 10], np.asarray(cells[(0.0, 1.0)])[1, 1])  # no frame there
    # The source, enlarged the same, sits left of every cell, level with the first row.
    found = np.all(pixels == np.asarray(source)[1, 1], axis=-1)
    ys, xs = np.nonzero(found)
    assert found.sum() == (source.width * scale) * (source.height * scale) - scale ** 2  # all but the corner
    assert xs.max() < min(box[0] for box in boxes.values()) and ys.min() == tops[-1.0]


def test_one_slider_grid_and_no_frame_without_a_zero_alpha():
    cells = {(a,): flat((50, int(80 + 40 * a), 90)) for a in (-0.5, 0.5)}
    picture, boxes = sweep_grid(flat((1, 2, 3)), cells, SliderAxis("slider", [0.5, -0.5]))
    pixels = np.asarray(picture)
    assert list(boxes) == [(-0.5,), (0.5,)] and boxes[(-0.5,)][0] < boxes[(0.5,)][0]
    assert not np.all(pixels == BASE_EDIT_FRAME, axis=-1).any()
    for key, (left, top, right, bottom) in boxes.items():
        assert np.array_equal(pixels[top:bottom, left:right], np.asarray(enlarge(cells[key], 7)))


def test_a_resized_context_image_is_shown_at_the_cell_size():
    cells = {(0.0,): flat((9, 9, 9), size=(48, 32))}
    picture, boxes = sweep_grid(flat((200, 100, 50), size=(50, 33)), cells, SliderAxis("slider", [0.0]))
    assert boxes[(0.0,)][2] - boxes[(0.0,)][0] == 48 * cell_scale((48, 32))


def test_motion_order_moves_one_slider_one_notch_per_frame():
    alphas = [1.0, -1.0, 0.0, 0.5]
    grid = [(a, b) for a in alphas for b in alphas]
    walk = motion_order(grid)
    assert sorted(walk) == sorted(grid) and walk[0] == (-1.0, -1.0)
    notch = {a: i for i, a in enumerate(sorted(alphas))}
    for (a, b), (c, d) in zip(walk, walk[1:]):
        assert abs(notch[a] - notch[c]) + abs(notch[b] - notch[d]) == 1, walk
    # One swept slider of three (the others held): sorted along it.
    held = [(0.5, a, -1.0) for a in alphas]
    assert motion_order(held) == [(0.5, a, -1.0) for a in sorted(alphas)]
    assert motion_order([(1.0,), (-1.0,)]) == [(-1.0,), (1.0,)]


def test_caption_lines_stack_above_the_frame():
    image = flat((9, 9, 9))
    one, two = with_caption(image, "a"), with_caption(image, "a\nb")
    assert two.height > one.height > image.height and one.width == image.width
    assert np.array_equal(np.asarray(two)[-image.height:], np.asarray(image))
