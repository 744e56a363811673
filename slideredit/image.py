"""Context-image preprocessing for FLUX.1 Kontext.

The context image is converted to RGB, resized (PIL LANCZOS) to the preferred Kontext resolution closest
in aspect ratio, floored to a multiple of 16 and scaled to [-1, 1]. This matches diffusers'
`FluxKontextPipeline` step for step, so the tensors are identical for an RGB input:

1. size floored to a multiple of 16 (`VaeImageProcessor.get_default_height_width`, scale factor 16);
2. with auto-resize, the preferred (W, H) minimising (|aspect - w/h|, w, h), aspect taken from step 1;
3. both sides floored to a multiple of 16 (`multiple_of`);
4. `PIL.Image.resize((W, H), LANCZOS)` (a same-size resize is a copy);
5. `np.asarray(image, float32) / 255`, then `2 * x - 1`, laid out (1, 3, H, W).

diffusers does no mode conversion (it expects RGB); we convert any common mode to RGB first.
"""
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# (W, H) pairs Kontext was trained on (BFL's list, also in diffusers).
PREFERRED_KONTEXT_RESOLUTIONS: list[tuple[int, int]] = [
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184),
    (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752),
    (1456, 720), (1504, 688), (1568, 672),
]

_ALPHA_MODES = ("RGBA", "RGBa", "LA", "PA")
_PLAIN_MODES = ("L", "P", "1", "CMYK", "YCbCr", "RGBX")
_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

ImageInput = Image.Image | str | Path | np.ndarray | torch.Tensor


def load_image(path: str | Path) -> Image.Image:
    """Read an image file fully (EXIF orientation applied, as photo viewers show it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except PermissionError:
        raise
    except (UnidentifiedImageError, OSError) as e:  # OSError: truncated or corrupt data
        raise ValueError(f"{path} is not an image file Pillow can read ({e})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any common PIL mode to 8-bit RGB.

    Transparent pixels are composited over white (what a user sees in a viewer), 16-bit data is scaled
    to 8 bit (v / 257, rounded) instead of clipped, and float ("F") data in [0, 1] is scaled by 255
    (otherwise it is taken to be on the 0..255 scale, as Pillow does). Mode "I" (32-bit int, how 16-bit
    grayscale files are often read) is taken as 16-bit data.
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _ALPHA_MODES or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    if mode in _PLAIN_MODES:
        return image.convert("RGB")
    if mode in _16BIT_MODES:
        gray = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257
    elif mode == "F":
        gray = np.asarray(image, dtype=np.float64)
        if gray.size and gray.min() >= 0 and gray.max() <= 1:
            gray = gray * 255
    else:
        raise ValueError(f"cannot convert an image of mode {mode!r} to RGB")
    gray = np.clip(np.round(gray), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def preferred_resolution(width: int, height: int) -> tuple[int, int]:
    """The preferred Kontext (W, H) closest in aspect ratio to width x height (ties: smaller w, then h)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect = width / height
    _, w, h = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return w, h


def context_size(width: int, height: int, *, auto_resize: bool = True, multiple_of: int = 16) -> tuple[int, int]:
    """The (W, H) a width x height context image is resized to (steps 1-3 of the module docstring)."""
    w, h = width // 16 * 16, height // 16 * 16
    if w == 0 or h == 0:
        raise ValueError(f"image is {width}x{height} pixels; Kontext needs at least 16 pixels on each side")
    if auto_resize:
        w, h = preferred_resolution(w, h)
    return w // multiple_of * multiple_of, h // multiple_of * multiple_of


def default_output_size(context_w: int, context_h: int) -> tuple[int, int]:
    """Default output (W, H): the context image's aspect ratio at about one megapixel, multiples of 16.

    This is the snapped preferred size of the context image (BFL's behaviour). diffusers instead defaults
    to 1024x1024 whatever the input, which distorts non-square edits.
    """
    return context_size(context_w, context_h, auto_resize=True)


def area_scaled_size(width: float, height: float, max_area: float, multiple_of: int = 16) -> tuple[int, int]:
    """(W, H) with the aspect ratio of width x height and about `max_area` (> 0) pixels, each side rounded,
    then floored to `multiple_of`: diffusers' FluxKontextPipeline rule for its `max_area` argument, in the
    same float operations (aspect first, then the square roots) so that the sizes agree to the pixel."""
    if width <= 0 or height <= 0:
        raise ValueError(f"height and width must be positive to scale them to max_area, got {width}x{height}")
    aspect = width / height
    w = round((max_area * aspect) ** 0.5) // multiple_of * multiple_of
    h = round((max_area / aspect) ** 0.5) // multiple_of * multiple_of
    if w == 0 or h == 0:
        raise ValueError(f"max_area={max_area} at aspect {aspect:.3g} gives a {w}x{h} output; Kontext needs at "
                         f"least {multiple_of} pixels on each side")
    return w, h


def _as_pil(image: ImageInput) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
            raise ValueError(
                f"numpy image must be uint8 (H, W), (H, W, 3) or (H, W, 4); got {image.dtype} {image.shape}"
            )
        return Image.fromarray(image)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(f"tensor image must be float (3, H, W) in [0, 1]; got {image.dtype} {tuple(image.shape)}")
        pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        return Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())
    raise TypeError(f"image must be a PIL image, a file path, a numpy array or a tensor; got {type(image).__name__}")


def prepare_context_image(
    image: ImageInput,
    *,
    width: int | None = None,
    height: int | None = None,
    auto_resize: bool = True,
    multiple_of: int = 16,
) -> torch.Tensor:
    """Context image -> (1, 3, H, W) float32 in [-1, 1], ready for the VAE encoder.

    `width` and `height` (both or neither) force the size, floored to `multiple_of`; otherwise the
    nearest preferred resolution is used (`auto_resize`) or the image's own size floored to 16.
    Numpy arrays (uint8) and tensors ((3, H, W) in [0, 1]) are quantised to an 8-bit PIL image first.
    """
    if (width is None) != (height is None):
        raise ValueError(f"give both width and height or neither; got width={width}, height={height}")
    pil = to_rgb(_as_pil(image))
    w, h = context_size(pil.width, pil.height, auto_resize=auto_resize, multiple_of=multiple_of)
    if width is not None:
        w, h = width // multiple_of * multiple_of, height // multiple_of * multiple_of
        if w == 0 or h == 0:
            raise ValueError(f"requested size {width}x{height} is smaller than {multiple_of} pixels on a side")
    pil = pil.resize((w, h), resample=Image.Resampling.LANCZOS)
    pixels = np.asarray(pil, dtype=np.float32) / 255.0
    return torch.from_numpy(2.0 * pixels - 1.0).permute(2, 0, 1).unsqueeze(0).contiguous()
