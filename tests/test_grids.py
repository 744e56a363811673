"""slideredit.grids: saved images take the format of their extension."""
import numpy as np
import pytest
from PIL import Image

from slideredit.grids import image_format, save_image


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
