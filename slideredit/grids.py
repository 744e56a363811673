"""Slider sweeps as pictures: a labelled grid PNG and an animated GIF, both written atomically."""
from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, ImageDraw

from .atomic import atomic_path

LABEL_HEIGHT = 18
# file extension -> PIL format of a saved image, and the keyword arguments it is saved with
IMAGE_FORMATS = {".png": ("PNG", {}), ".jpg": ("JPEG", {"quality": 95}), ".jpeg": ("JPEG", {"quality": 95}),
                 ".webp": ("WEBP", {"quality": 95})}


def labelled_grid(rows: list[list[Image.Image]], row_labels: list[str] | None, col_labels: list[str],
                  title: str | None = None) -> Image.Image:
    """Images laid out row by row (all the same size), a label above each column and, when given,
    left of each row, and a title line above everything."""
    width, height = rows[0][0].size
    left = 0 if row_labels is None else 8 * max(len(label) for label in row_labels) + 8
    top = LABEL_HEIGHT * (2 if title else 1)
    grid = Image.new("RGB", (left + width * len(rows[0]), top + height * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((4, 3), title, fill="black")
    for j, label in enumerate(col_labels):
        draw.text((left + j * width + 4, top - LABEL_HEIGHT + 3), label, fill="black")
    for i, row in enumerate(rows):
        if row_labels is not None:
            draw.text((4, top + i * height + height // 2 - 5), row_labels[i], fill="black")
        for j, image in enumerate(row):
            grid.paste(image, (left + j * width, top + i * height))
    return grid


def with_caption(image: Image.Image, caption: str) -> Image.Image:
    """The image with a caption strip above it (GIF frames say which alpha they show)."""
    framed = Image.new("RGB", (image.width, image.height + LABEL_HEIGHT), "white")
    framed.paste(image, (0, LABEL_HEIGHT))
    ImageDraw.Draw(framed).text((4, 3), caption, fill="black")
    return framed


def image_format(path: str | os.PathLike) -> str:
    """The format an image saved at `path` gets, from its extension (case-insensitive): PNG, JPEG or WEBP."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise ValueError(f"{path}: cannot tell the image format from the extension {suffix or '(none)'!r}; "
                         f"use {', '.join(IMAGE_FORMATS)}")
    return IMAGE_FORMATS[suffix][0]


def save_image(image: Image.Image, path: str | os.PathLike) -> Path:
    """Save atomically in the format of the extension (image_format); JPEG has no alpha: saved as RGB."""
    fmt = image_format(path)  # an unknown extension is an error, before anything is written
    options = IMAGE_FORMATS[Path(path).suffix.lower()][1]
    if fmt == "JPEG" and image.mode != "RGB":
        image = image.convert("RGB")
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt, **options)
    return Path(path)


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def save_gif(frames: list[Image.Image], path: str | os.PathLike, frame_ms: int = 400) -> Path:
    """An endlessly looping GIF that goes forward through the frames and back (a slider sweep)."""
    loop = frames + frames[-2:0:-1]
    with atomic_path(path) as tmp:
        loop[0].save(tmp, format="GIF", save_all=True, append_images=loop[1:], duration=frame_ms, loop=0)
    return Path(path)
