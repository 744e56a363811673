import numpy as np
import pytest
import torch
from PIL import Image

from slideredit.image import (
    PREFERRED_KONTEXT_RESOLUTIONS,
    area_scaled_size,
    context_size,
    default_output_size,
    load_image,
    prepare_context_image,
    preferred_resolution,
    to_rgb,
)


def rgb(image: Image.Image) -> np.ndarray:
    converted = to_rgb(image)
    assert converted.mode == "RGB" and converted.size == image.size
    return np.asarray(converted)


def test_rgb_is_unchanged():
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(rgb(Image.fromarray(pixels)), pixels)


def test_rgba_is_composited_over_white():
    image = Image.new("RGBA", (3, 1))
    image.putpixel((0, 0), (10, 20, 30, 0))  # fully transparent -> white, whatever its colour
    image.putpixel((1, 0), (0, 0, 0, 128))  # half transparent black -> mid grey
    image.putpixel((2, 0), (10, 20, 30, 255))  # opaque -> unchanged
    out = rgb(image)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert np.all(np.abs(out[0, 1].astype(int) - 127) <= 1)
    assert out[0, 2].tolist() == [10, 20, 30]


def test_la_and_pa_are_composited_over_white():
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (0, 0))
    la.putpixel((1, 0), (100, 255))
    assert rgb(la).tolist() == [[[255, 255, 255], [100, 100, 100]]]
    pa = Image.new("PA", (1, 1))
    pa.putpalette([200, 10, 10] * 256)
    pa.putpixel((0, 0), (0, 0))
    assert rgb(pa)[0, 0].tolist() == [255, 255, 255]


def test_palette_with_and_without_transparency():
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    assert rgb(image).tolist() == [[[255, 0, 0], [0, 0, 255]]]
    image.info["transparency"] = 1  # palette index 1 is transparent
    assert rgb(image).tolist() == [[[255, 0, 0], [255, 255, 255]]]


def test_grayscale_and_bilevel():
    assert rgb(Image.new("L", (1, 1), 77))[0, 0].tolist() == [77, 77, 77]
    assert rgb(Image.new("1", (1, 1), 1))[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize("mode, dtype", [("I;16", "<u2"), ("I;16B", ">u2")])
def test_16_bit_is_scaled_not_clipped(mode, dtype):
    values = np.array([[0, 1000, 257 * 100, 65535]], dtype=dtype)
    image = Image.frombytes(mode, (4, 1), values.tobytes())
    assert rgb(image)[0, :, 0].tolist() == [0, 4, 100, 255]  # round(v / 257)


def test_32_bit_int_is_read_as_16_bit():
    image = Image.fromarray(np.array([[0, 1000, 65535, 70000]], dtype=np.int32))
    assert image.mode == "I"
    assert rgb(image)[0, :, 0].tolist() == [0, 4, 255, 255]


def test_float_images():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert rgb(unit)[0, :, 0].tolist() == [0, 128, 255]
    byte_scale = Image.fromarray(np.array([[0.0, 200.0, 300.0]], dtype=np.float32))
    assert rgb(byte_scale)[0, :, 0].tolist() == [0, 200, 255]


def test_cmyk():
    image = Image.new("CMYK", (2, 1))
    image.putpixel((0, 0), (0, 0, 0, 0))
    image.putpixel((1, 0), (255, 0, 0, 0))
    assert rgb(image).tolist() == [[[255, 255, 255], [0, 255, 255]]]


def test_unsupported_mode_is_named():
    with pytest.raises(ValueError, match="HSV"):
        to_rgb(Image.new("HSV", (2, 2)))


@pytest.mark.parametrize(
    "size, expected",
    [((4000, 500), (1568, 672)), ((300, 3000), (672, 1568)), ((777, 777), (1024, 1024)), ((1500, 1000), (1248, 832))],
)
def test_preferred_resolution(size, expected):
    assert preferred_resolution(*size) == expected


def test_preferred_resolutions_map_to_themselves():
    for w, h in PREFERRED_KONTEXT_RESOLUTIONS:
        assert w % 16 == 0 and h % 16 == 0
        assert preferred_resolution(w, h) == (w, h)


def test_sizes_are_floored_to_multiples():
    assert context_size(1000, 700, auto_resize=False) == (992, 688)
    assert context_size(1000, 700, auto_resize=False, multiple_of=64) == (960, 640)
    assert context_size(4000, 500, multiple_of=64) == (1536, 640)
    assert default_output_size(4000, 500) == (1568, 672)
    image = Image.new("RGB", (1000, 700), (255, 0, 0))
    tensor = prepare_context_image(image, auto_resize=False)
    assert tensor.shape == (1, 3, 688, 992) and tensor.dtype == torch.float32
    assert torch.equal(tensor[0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    assert prepare_context_image(image, width=500, height=300).shape == (1, 3, 288, 496)


def test_area_scaled_size_by_hand():
    """Aspect 5:3 at 512**2 pixels: sqrt(262144 x 5/3) = 660.99 -> 661 -> 656 and sqrt(262144 x 3/5) =
    396.59 -> 397 -> 384. Each side is rounded before it is floored: sqrt(261837) = 511.7 gives 512, not 496."""
    assert area_scaled_size(500, 300, 512 ** 2) == (656, 384)
    assert area_scaled_size(40, 40, 261_837) == (512, 512)
    assert area_scaled_size(1024, 1024, 1024 ** 2) == (1024, 1024)
    with pytest.raises(ValueError, match="max_area=200 at aspect 2 gives a 16x0 output"):
        area_scaled_size(64, 32, 200)
    with pytest.raises(ValueError, match="must be positive.*got 64x0"):
        area_scaled_size(64, 0, 4096)


def test_too_small_images_are_rejected():
    with pytest.raises(ValueError, match="15x40"):
        prepare_context_image(Image.new("RGB", (15, 40)))
    with pytest.raises(ValueError, match="smaller than 16"):
        prepare_context_image(Image.new("RGB", (64, 64)), width=8, height=64)
    with pytest.raises(ValueError, match="both"):
        prepare_context_image(Image.new("RGB", (64, 64)), width=64)


def test_load_image_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="notes.png"):
        load_image(text)
    with pytest.raises(ValueError, match="notes.png"):
        prepare_context_image(text)


def test_load_image_applies_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (40, 20)).save(path, exif=exif)
    assert load_image(path).size == (20, 40)


def test_inputs_of_every_kind_agree(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    path = tmp_path / "image.png"
    Image.fromarray(pixels).save(path)
    expected = prepare_context_image(Image.fromarray(pixels))
    assert torch.equal(prepare_context_image(path), expected)
    assert torch.equal(prepare_context_image(str(path)), expected)
    assert torch.equal(prepare_context_image(pixels), expected)
    assert torch.equal(prepare_context_image(torch.from_numpy(pixels).permute(2, 0, 1) / 255.0), expected)
    with pytest.raises(TypeError, match="list"):
        prepare_context_image([pixels])


@pytest.fixture(scope="module")
def kontext_pipeline(tiny_kontext_dir):
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(tiny_kontext_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _Captured(Exception):
    pass


@pytest.mark.parametrize("auto_resize", [True, False])
def test_matches_diffusers_pipeline_preprocessing(kontext_pipeline, monkeypatch, auto_resize):
    """The tensor diffusers' FluxKontextPipeline hands its VAE equals ours, bit for bit."""

    def capture(image, *args, **kwargs):
        raise _Captured(image)

    monkeypatch.setattr(kontext_pipeline.vae, "encode", capture)
    pixels = np.random.default_rng(2).integers(0, 256, (301, 517, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    with pytest.raises(_Captured) as captured:
        kontext_pipeline(image=image, prompt="add a hat", num_inference_steps=1, _auto_resize=auto_resize)
    ours = prepare_context_image(image, auto_resize=auto_resize)
    assert ours.shape == ((1, 3, 752, 1392) if auto_resize else (1, 3, 288, 512))
    assert torch.equal(ours, captured.value.args[0])
