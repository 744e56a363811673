"""Fidelity: does an edited image show what its edit strengths say, and nothing else?

The attribute readers of `shapes.py` read one attribute along one axis: `edit_strength` projects the read
colour on the segment source colour -> target colour, so a square that turns dark GREEN instead of dark
red still reads as "darker", and a circle that turns teal under a size slider reads nothing at all. The
fidelity reader closes that gap. For an image, its source scene and its edits:

1. read each edit's strength with `edit_strength` (0 = the source's attribute, 1 = the target's);
2. build the IDEAL scene: the source with every edit carried out to exactly its read strength
   (`ideal_scene`), and render it with the exact renderer;
3. compare the image with that render:
   - image error: mean |RGB difference| over every pixel and channel (0..255 scale);
   - per shape, core-colour error: the Euclidean RGB distance between the mean colour of the shape's
     interior in the image and in the ideal render. The interior is the ideal shape shrunk by
     INTERIOR_MARGIN pixels, so anti-aliased or blurred edges and a slightly wrong size do not count;
     what is left is the colour itself: a leak off the edit's axis, or a colour no edit asked for;
   - per shape, its position: the centroid read in the image minus the centroid read in the ideal
     render (pixels), and its size: the size read in the image minus the size read in the ideal render
     (pixels). Edits never move shapes, so any offset is an error; for a shape with a size edit the size
     error is about 0 by construction (its strength was read from that size), for any other shape it is
     how far its size drifted.

An ideal render reads as (almost) zero error: only the readers' own rounding remains (tests measure it).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from .shapes import (HALF, IMAGE_SIZE, SHAPES, Edit, Scene, Shape, apply_edits, coverage, edit_strength, pixel_array,
                     read_shape, render)

INTERIOR_MARGIN = 3.0  # pixels: a shape's interior keeps this far inside its ideal edge (at most half its extent)
MIN_IDEAL_SIZE = 0.5  # pixels: a shape read as (nearly) gone is drawn as a speck (a Scene needs a positive size)

RGBFloat = tuple[float, float, float]


@dataclass(frozen=True)
class ShapeFidelity:
    """One shape of an image against the same shape in the ideal render (see the module docstring)."""
    color: RGBFloat  # mean RGB of the shape's interior in the image
    ideal_color: RGBFloat  # mean RGB of the same pixels in the ideal render
    color_error: float  # Euclidean distance between `color` and `ideal_color` (RGB, 0..255 per channel)
    offset: tuple[float, float]  # (x, y) centroid read in the image minus centroid read in the ideal render, px
    size_error: float  # size read in the image minus size read in the ideal render, px (side or radius)

    @property
    def position_error(self) -> float:
        """How far the shape moved, in pixels: the length of `offset`."""
        return math.hypot(*self.offset)


@dataclass(frozen=True)
class FidelityReading:
    """An edited image against the ideal render of its read edit strengths (see the module docstring)."""
    strengths: tuple[float, ...]  # each edit's read strength, in the order the edits were given
    ideal: Scene  # the source with every edit carried out to its read strength
    image_error: float  # mean |image - ideal render| over every pixel and channel, 0..255
    shapes: dict[str, ShapeFidelity]  # "square", "circle"

    @property
    def color_error(self) -> float:
        """The larger of the two shapes' core-colour errors."""
        return max(shape.color_error for shape in self.shapes.values())

    @property
    def position_error(self) -> float:
        """The larger of the two shapes' centroid offsets, px."""
        return max(shape.position_error for shape in self.shapes.values())

    @property
    def size_error(self) -> float:
        """The larger of the two shapes' |size error|, px."""
        return max(abs(shape.size_error) for shape in self.shapes.values())


def _largest_fitting_size(shape: Shape) -> float:
    """The largest size (side or radius) at which the shape still fits in its half of the image."""
    (x, y), (lo, hi) = shape.center, HALF[shape.kind]
    extent = min(x - lo, hi - x, y, IMAGE_SIZE - y)
    return 2 * extent if shape.kind == "square" else extent


def edit_at_strength(scene: Scene, edit: Edit, strength: float) -> Scene:
    """`scene` with `edit` carried out to `strength` along the segment `edit_strength` reads on: 0 = the
    scene's attribute, 1 = the edit's target, linear in between and beyond. Colours are clipped to 0..255 and
    rounded (a render is uint8 anyway); sizes are kept between MIN_IDEAL_SIZE and the largest that fits in
    the shape's half, so a runaway strength still gives a scene to render."""
    before, after = scene.shape(edit.shape), apply_edits(scene, [edit]).shape(edit.shape)
    if edit.attribute == "size":
        size = before.size + strength * (after.size - before.size)
        return scene.with_shape(edit.shape, size=float(np.clip(size, MIN_IDEAL_SIZE, _largest_fitting_size(before))))
    color = np.asarray(before.color, np.float64) + strength * np.subtract(after.color, before.color)
    return scene.with_shape(edit.shape, color=tuple(int(c) for c in np.clip(np.round(color), 0, 255)))


def ideal_scene(source: Scene, edits: Sequence[Edit], strengths: Sequence[float]) -> Scene:
    """The source with each edit carried out to its strength (edits on distinct attributes, as in a prompt)."""
    if len(edits) != len(strengths):
        raise ValueError(f"one strength per edit: {len(edits)} edits, {len(strengths)} strengths")
    apply_edits(source, edits)  # refuses two edits of one attribute, which would overwrite each other here
    scene = source
    for edit, strength in zip(edits, strengths):
        scene = edit_at_strength(scene, edit, strength)
    return scene


def interior(shape: Shape) -> np.ndarray:
    """(H, W) weights of the shape's interior: the coverage of the shape shrunk by INTERIOR_MARGIN pixels
    (by half its extent when it is smaller than that). With the margin over sqrt(2) every pixel with a
    weight lies wholly inside the shape, away from its anti-aliased edge."""
    margin = min(INTERIOR_MARGIN, shape.extent() / 2)
    shrink = 2 * margin if shape.kind == "square" else margin  # the square's size is its side
    return coverage(replace(shape, size=shape.size - shrink))


def _interior_color(pixels: np.ndarray, weights: np.ndarray) -> RGBFloat:
    return tuple(float(v) for v in (pixels * weights[..., None]).sum(axis=(0, 1)) / weights.sum())


def _shape_fidelity(pixels: np.ndarray, ideal_pixels: np.ndarray, shape: Shape) -> ShapeFidelity:
    weights = interior(shape)
    color, ideal_color = _interior_color(pixels, weights), _interior_color(ideal_pixels, weights)
    read, ideal_read = (read_shape(p, shape.kind, shape.center) for p in (pixels, ideal_pixels))
    return ShapeFidelity(color=color, ideal_color=ideal_color,
                         color_error=float(np.linalg.norm(np.subtract(color, ideal_color))),
                         offset=(read.centroid[0] - ideal_read.centroid[0], read.centroid[1] - ideal_read.centroid[1]),
                         size_error=read.size - ideal_read.size)


def read_fidelity(image: Image.Image | np.ndarray, source: Scene, edits: Sequence[Edit]) -> FidelityReading:
    """Read how faithfully `image` shows `source` edited by `edits`, at the strengths it carries them to.

    No edits: the ideal is the source itself (an identity edit, or the neutral prompt)."""
    pixels = pixel_array(image)
    strengths = tuple(edit_strength(pixels, source, edit) for edit in edits)
    ideal = ideal_scene(source, edits, strengths)
    ideal_pixels = render(ideal).astype(np.float64)
    return FidelityReading(strengths=strengths, ideal=ideal,
                           image_error=float(np.abs(pixels - ideal_pixels).mean()),
                           shapes={kind: _shape_fidelity(pixels, ideal_pixels, ideal.shape(kind)) for kind in SHAPES})
