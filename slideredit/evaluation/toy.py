"""Offline scorers for sweeps of the toy model: edit strength and fidelity, read with the toy world's readers.

No network and no learned model: the source scene is measured back from the sweep's source image, and
each cell is scored with `slideredit.toy.shapes.edit_strength` (0 = the source's attribute, 1 = the
edit's target, above 1 exaggerated) and with `slideredit.toy.fidelity.read_fidelity` (how far the cell
is from the ideal render of its read strengths: colour leaks, moved shapes, sizes nobody asked to
change). A sweep made with the toy model is recognised by its model folder holding the toy transformer
file (`slideredit.toy.models.TRANSFORMER_FILE`, "flux1-toy.safetensors").
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..toy.fidelity import read_fidelity
from ..toy.shapes import (BACKGROUND, HALF, IMAGE_SIZE, SHAPES, Edit, Scene, Shape, edit_strength,
                          parse_instruction, read_shape)
from .loading import check_images

TOY_TRANSFORMER_FILE = "flux1-toy.safetensors"  # slideredit.toy.models.TRANSFORMER_FILE, without importing it
# ToyFidelity's metrics (slideredit.toy.fidelity.FidelityReading's quantities, "toy_" + name) and their titles
TOY_FIDELITY_TITLES = {
    "toy_image_error": "toy_image_error: mean |RGB| off the ideal render (0..255)",
    "toy_color_error": "toy_color_error: worst shape's core colour off the ideal (RGB distance)",
    "toy_position_error": "toy_position_error: worst shape's centroid offset (px)",
    "toy_size_error": "toy_size_error: worst shape's |size| off the ideal (px)",
}


def is_toy_model(model: str | os.PathLike, relative_to: Path | None = None) -> bool:
    """True when `model` names a toy model folder: it holds the toy transformer file.

    A relative path is tried from the working directory, then from `relative_to` (e.g. the sweep folder).
    """
    path = Path(model).expanduser()
    candidates = [path] if path.is_absolute() or relative_to is None else [path, relative_to / path]
    return any((folder / TOY_TRANSFORMER_FILE).is_file() for folder in candidates)


def _rough_center(pixels: np.ndarray, kind: str) -> tuple[float, float]:
    """The centre of the pixels of the shape's half that differ most from the background."""
    lo, hi = HALF[kind]
    half = pixels[:, lo:hi]
    distance = np.linalg.norm(half - np.asarray(BACKGROUND, np.float64), axis=-1)
    inside = distance > 0.5 * distance.max() if distance.max() > 0 else np.zeros_like(distance, bool)
    if not inside.any():
        raise ValueError(f"no {kind} to read: its half of the image is plain background")
    ys, xs = np.nonzero(inside)
    return float(xs.mean() + lo + 0.5), float(ys.mean() + 0.5)


def read_source_scene(image: Image.Image) -> Scene:
    """The toy scene of a source image: each shape's colour, size and centre, measured with the readers.

    Two passes: the centre of the shape's strongest pixels, then the readers' weighted centroid.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    if pixels.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"a toy source image is {IMAGE_SIZE}x{IMAGE_SIZE}, got {image.width}x{image.height}")
    shapes = {}
    for kind in SHAPES:
        reading = read_shape(pixels, kind, _rough_center(pixels, kind))
        reading = read_shape(pixels, kind, reading.centroid)
        shapes[kind] = Shape(kind, tuple(int(round(c)) for c in reading.color), reading.size, reading.centroid)
    try:
        return Scene(**shapes)
    except ValueError as err:
        raise ValueError(f"the source image is not a toy scene: {err}") from None


def other_instructions(prompt: str, instruction: str) -> list[str]:
    """The single edits of `prompt` that `instruction` does not hold, in prompt order."""
    own = set(parse_instruction(instruction))
    return [edit.instruction for edit in parse_instruction(prompt) if edit not in own]


def _toy_inputs(images: Sequence[Image.Image], source: Image.Image) -> tuple[list[Image.Image], Scene]:
    """The images as RGB, checked to be the readers' 128x128, and the source image's scene."""
    images = check_images(images)
    scene = read_source_scene(source)
    for index, image in enumerate(images):
        if image.size != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"images[{index}] is {image.width}x{image.height}; the toy readers need "
                             f"{IMAGE_SIZE}x{IMAGE_SIZE}")
    return images, scene


class ToyEditStrength:
    """(images, source image, toy instruction) -> (N,) edit strengths, float64.

    An instruction of several edits ("make the square red and make the circle larger") scores the mean
    of its edits' strengths. The readers need 128x128 images (the toy model's size).
    """

    def __call__(self, images: Sequence[Image.Image], source: Image.Image, instruction: str) -> torch.Tensor:
        edits: tuple[Edit, ...] = parse_instruction(instruction)
        if not edits:
            raise ValueError(f"{instruction!r} holds no toy edit to measure")
        images, scene = _toy_inputs(images, source)
        strengths = [[edit_strength(image, scene, edit) for edit in edits] for image in images]
        return torch.tensor(strengths, dtype=torch.float64).mean(dim=1)


class ToyFidelity:
    """(images, source image, toy prompt) -> {metric: (N,) float64}, the metrics of TOY_FIDELITY_TITLES.

    Each image against the ideal render of the prompt's edits (all of them: the ideal is the whole edited
    scene) at the strengths read from that image, see slideredit/toy/fidelity.py: the image error (mean
    |RGB|), and the worse shape's core-colour error (RGB distance), centroid offset and |size error| (px).
    0 is a faithful picture. The source scene is read from the source image, so even an exact render of
    its edits reads a little above 0 (the readers' size error, about 0.1 px per edge).
    """

    def __call__(self, images: Sequence[Image.Image], source: Image.Image, prompt: str) -> dict[str, torch.Tensor]:
        edits = parse_instruction(prompt)
        images, scene = _toy_inputs(images, source)
        readings = [read_fidelity(image, scene, edits) for image in images]
        return {name: torch.tensor([getattr(reading, name.removeprefix("toy_")) for reading in readings],
                                   dtype=torch.float64)
                for name in TOY_FIDELITY_TITLES}
