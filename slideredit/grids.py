"""Slider sweeps as pictures: a labelled grid PNG and an animated GIF, both written atomically.

`sweep_grid` is the picture a newcomer reads at a glance: the source beside the grid, cells enlarged
(nearest neighbour) until the small toy images are visible, axes sorted by alpha with labels saying
which end is stronger, and the base edit (every alpha 0) framed. `motion_order` walks a sweep so that
consecutive GIF frames differ by one step of one slider.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .atomic import atomic_path

LABEL_HEIGHT = 18
MIN_CELL = 256  # cells smaller than this (pixels, longer side) are enlarged by an integer factor
FONT_SIZE = 14
BASE_EDIT_FRAME = (230, 120, 0)  # the frame and labels of the base edit (all alphas 0)
FRAME_WIDTH = 4
GAP = 12  # pixels between the source panel and the grid, and around the picture
CELL_GAP = 4  # white pixels between neighbouring cells
# file extension -> PIL format of a saved image, and the keyword arguments it is saved with
IMAGE_FORMATS = {".png": ("PNG", {}), ".jpg": ("JPEG", {"quality": 95}), ".jpeg": ("JPEG", {"quality": 95}),
                 ".webp": ("WEBP", {"quality": 95})}


def labelled_grid(rows: list[list[Image.Image]], row_labels: list[str] | None, col_labels: list[str],
                  title: str | None = None) -> Image.Image:
    """Images laid out row by row (all the same size), a label above each column and, when given,
    left of each row, and a title line above everything."""
    width, height = rows[0][0].size
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))  # the default font, which draw.text uses below
    # measured, not guessed from the length: labels start at x = 4, cells 4 px right of the widest one's ink
    left = 0 if row_labels is None else 4 + max(measure.textbbox((4, 0), label)[2] for label in row_labels)
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


@dataclass(frozen=True)
class SliderAxis:
    """One axis of a sweep grid: the slider's name (its instruction) and the alphas along it."""
    name: str
    alphas: Sequence[float]


@functools.lru_cache(maxsize=None)
def font(size: int = FONT_SIZE) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)  # parsed once per size: every GIF frame's caption uses it


def cell_scale(size: tuple[int, int]) -> int:
    """The nearest-neighbour enlargement of a cell: the integer factor that makes its longer side at
    least MIN_CELL pixels (1 for images already that large)."""
    return max(1, -(-MIN_CELL // max(size)))


def enlarge(image: Image.Image, scale: int) -> Image.Image:
    return image if scale == 1 else image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def alpha_label(alpha: float) -> str:
    return f"{alpha:+.2f}" if alpha else "0 = base edit"


def direction(alphas: Sequence[float]) -> tuple[str, str]:
    """What the two ends of an ascending axis mean: negative alphas exaggerate, positive ones suppress."""
    return ("stronger (exaggerated)" if alphas[0] < 0 else "base edit" if alphas[0] == 0 else "weaker",
            "weaker (suppressed)" if alphas[-1] > 0 else "base edit" if alphas[-1] == 0 else "stronger")


def sweep_grid(source: Image.Image, cells: dict[tuple[float, ...], Image.Image], columns: SliderAxis,
               rows: SliderAxis | None = None, title: str | None = None) -> tuple[Image.Image, dict]:
    """The picture of a sweep over one slider (cells keyed (alpha,)) or two (keyed (row alpha, column
    alpha)). Returns the picture and where each cell landed: {key: (left, top, right, bottom)}.

    Both axes run in ascending alpha: left to right and top to bottom, stronger to weaker. The source
    sits left of the grid at the same enlargement; the base edit's row, column and labels are drawn in
    BASE_EDIT_FRAME and its cell framed."""
    cell_size = next(iter(cells.values())).size
    if source.size != cell_size:  # the pipeline resized the context image (to multiples of 16, say)
        source = source.resize(cell_size, Image.BICUBIC)
    scale = cell_scale(cell_size)
    w, h = cell_size[0] * scale, cell_size[1] * scale
    col_alphas, row_alphas = sorted(columns.alphas), sorted(rows.alphas) if rows else [None]
    text, small = font(), font(FONT_SIZE - 2)
    line = FONT_SIZE + 6
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    row_label_width = 0 if rows is None else 8 + max(int(measure.textlength(alpha_label(a), font=small))
                                                         for a in row_alphas)
    header = [title] if title else []
    header.append(f"columns: {columns.name}")
    if rows is not None:
        header.append(f"rows: {rows.name}")
    top = GAP + line * len(header) + line + line  # header lines, the column direction, the column alphas
    grid_left = GAP + w + GAP + row_label_width
    pitch_x, pitch_y = w + CELL_GAP, h + CELL_GAP
    width = grid_left + pitch_x * len(col_alphas) + GAP
    height = top + pitch_y * len(row_alphas) + GAP + (line if rows is not None else 0)
    picture = Image.new("RGB", (max(width, GAP + int(max(measure.textlength(t, font=text) for t in header)) + GAP),
                                height), "white")
    draw = ImageDraw.Draw(picture)
    for k, words in enumerate(header):
        draw.text((GAP, GAP + k * line), words, font=text, fill="black")

    stronger, weaker = direction(col_alphas)
    y = top - 2 * line
    draw.text((grid_left, y), "<- " + stronger, font=small, fill="black")
    right = grid_left + pitch_x * len(col_alphas) - CELL_GAP
    draw.text((right - measure.textlength(weaker + " ->", font=small), y), weaker + " ->", font=small, fill="black")
    for j, alpha in enumerate(col_alphas):
        draw.text((grid_left + j * pitch_x + 4, top - line), alpha_label(alpha), font=small,
                  fill=BASE_EDIT_FRAME if alpha == 0 else "black")

    draw.text((GAP, top - line), "source", font=small, fill="black")
    picture.paste(enlarge(source, scale), (GAP, top))
    if rows is not None:
        up, down = direction(row_alphas)
        draw.text((GAP + w + GAP, top + pitch_y * len(row_alphas)), f"top: {up}, bottom: {down}", font=small,
                  fill="black")

    boxes = {}
    for i, row_alpha in enumerate(row_alphas):
        y = top + i * pitch_y
        if rows is not None:
            draw.text((GAP + w + GAP, y + h // 2 - FONT_SIZE // 2), alpha_label(row_alpha), font=small,
                      fill=BASE_EDIT_FRAME if row_alpha == 0 else "black")
        for j, col_alpha in enumerate(col_alphas):
            key = (col_alpha,) if rows is None else (row_alpha, col_alpha)
            box = (grid_left + j * pitch_x, y, grid_left + j * pitch_x + w, y + h)
            picture.paste(enlarge(cells[key], scale), box[:2])
            boxes[key] = box
    base = (0.0,) if rows is None else (0.0, 0.0)
    if base in boxes:
        l, t, r, b = boxes[base]
        draw.rectangle((l, t, r - 1, b - 1), outline=BASE_EDIT_FRAME, width=FRAME_WIDTH)
    return picture, boxes


def motion_order(keys: Sequence[tuple[float, ...]]) -> list[tuple[float, ...]]:
    """A walk through a sweep's cells (alpha tuples) in which each step moves one slider by one notch:
    sorted along one swept slider; over two, row by row with every other row reversed (a serpentine),
    so a GIF of it plays as a motion instead of jumping back at the end of each row."""
    keys = list(keys)
    swept = [d for d in range(len(keys[0])) if len({k[d] for k in keys}) > 1]
    if len(swept) <= 1:
        return sorted(keys, key=lambda k: k[swept[0]] if swept else 0.0)
    outer, inner = swept[0], swept[1]
    walk = []
    for i, value in enumerate(sorted({k[outer] for k in keys})):
        row = sorted((k for k in keys if k[outer] == value), key=lambda k: k[inner], reverse=i % 2 == 1)
        walk.extend(row)
    return walk


def with_caption(image: Image.Image, caption: str) -> Image.Image:
    """The image with a caption strip above it, one line per line of `caption` (GIF frames say which
    alphas they show)."""
    lines = caption.split("\n")
    line = FONT_SIZE + 6
    framed = Image.new("RGB", (image.width, image.height + line * len(lines) + 4), "white")
    framed.paste(image, (0, line * len(lines) + 4))
    draw = ImageDraw.Draw(framed)
    for k, words in enumerate(lines):
        draw.text((4, 3 + k * line), words, font=font(FONT_SIZE - 2), fill="black")
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
