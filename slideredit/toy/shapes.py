"""The toy editing world: a square and a circle on a plain background, edited by instruction.

A 128x128 scene holds a square in the left half and a circle in the right half. Each has a colour and a
size (side or radius, in pixels) and sits near a fixed centre. Single edits change one attribute of one
shape: its colour to a palette colour ("make the square red"), its size by a fixed step ("make the circle
larger") or its brightness by a fixed factor ("make the square darker"). Size and brightness are
continuous in both directions, so a slider can exaggerate them past the edit's target; a palette colour
is categorical (past "red" there is nothing redder), so a colour slider can only suppress. An
instruction joins single edits on distinct slots (a shape's colour, which brightness also changes, and
its size) with " and ". The target image is rendered exactly from the edited scene.

The readers measure the attributes back from any image (a render or a model's output) given where the
shapes are: the colour at a shape's centre, its area from how far each pixel moved from the background
towards that colour, hence its size and centroid. `edit_strength` puts one edit on a continuous scale:
0 = the source's value, 1 = the edit's target value, above 1 exaggerated, below 0 reversed.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SIZE = 128
BACKGROUND = (235, 235, 235)
COLORS = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200), "yellow": (225, 190, 30)}
SHAPES = ("square", "circle")
HALF = {"square": (0, IMAGE_SIZE // 2), "circle": (IMAGE_SIZE // 2, IMAGE_SIZE)}  # x range of each shape
CENTER = {"square": (32.0, 64.0), "circle": (96.0, 64.0)}  # (x, y) before jitter
CENTER_JITTER = 4  # pixels, integer offsets in x and y
SOURCE_SIZES = {"square": (22.0, 34.0), "circle": (11.0, 17.0)}  # side / radius of a source scene
SIZE_STEP = {"square": 10.0, "circle": 6.0}  # what "larger" adds and "smaller" takes away
COLOR_JITTER = 16  # a source colour is a palette colour moved by up to this much per channel
SIZE_WORDS = ("larger", "smaller")
BRIGHTNESS_WORDS = ("darker", "lighter")
DARKER = 0.5  # "darker" scales each channel by this: halfway to black
LIGHTER = 0.5  # "lighter" moves each channel this fraction of the way to white
NEUTRAL_PROMPT = "keep the image the same"  # GSTLoRA's teacher prompt; the base model leaves the image as is
JOINER = " and "
CORE_RADIUS = 3.0  # the colour of a shape is read within this distance of its centre
DEAD_ZONE = 0.1  # per-pixel shape weights below this are background noise (see `shape_weights`)
MIN_CONTRAST = 10.0  # a shape colour closer than this (RGB distance) to the background has no readable area

RGB = tuple[int, int, int]


# ---------------------------------------------------------------------------------------------------
# Scenes and edits
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    kind: str  # "square" or "circle"
    color: RGB
    size: float  # side of the square, radius of the circle (pixels)
    center: tuple[float, float]  # (x, y) in pixel coordinates: pixel (i, j) covers [j, j+1] x [i, i+1]

    def extent(self) -> float:
        """Half the width of the shape."""
        return self.size / 2 if self.kind == "square" else self.size


@dataclass(frozen=True)
class Scene:
    square: Shape
    circle: Shape

    def __post_init__(self):
        for kind in SHAPES:
            shape = self.shape(kind)
            if shape.kind != kind:
                raise ValueError(f"Scene.{kind} holds a {shape.kind}")
            (x, y), r = shape.center, shape.extent()
            lo, hi = HALF[kind]
            if not (shape.size > 0 and lo <= x - r and x + r <= hi and 0 <= y - r and y + r <= IMAGE_SIZE):
                raise ValueError(f"the {kind} (size {shape.size}, centre {shape.center}) does not fit in its half "
                                 f"of the image (x in [{lo}, {hi}], y in [0, {IMAGE_SIZE}])")

    def shape(self, kind: str) -> Shape:
        if kind not in SHAPES:
            raise ValueError(f"unknown shape {kind!r}; the toy world has {SHAPES}")
        return getattr(self, kind)

    def with_shape(self, kind: str, **changes) -> "Scene":
        return replace(self, **{kind: replace(self.shape(kind), **changes)})


EDIT_VALUES = (*COLORS, *SIZE_WORDS, *BRIGHTNESS_WORDS)


@dataclass(frozen=True)
class Edit:
    """One attribute of one shape: a colour (a name in COLORS), a size step ("larger", "smaller") or a
    brightness step ("darker", "lighter")."""
    shape: str
    value: str

    def __post_init__(self):
        if self.shape not in SHAPES or self.value not in EDIT_VALUES:
            raise ValueError(f"no such edit: the {self.shape!r} made {self.value!r}; shapes are {SHAPES}, "
                             f"values {EDIT_VALUES}")

    @property
    def attribute(self) -> str:
        """"color", "size" or "brightness"."""
        return "size" if self.value in SIZE_WORDS else "brightness" if self.value in BRIGHTNESS_WORDS else "color"

    @property
    def slot(self) -> str:
        """What of the shape the edit writes: "size", or "color" (a brightness edit rewrites the colour too,
        so one instruction never holds both a colour and a brightness edit of one shape)."""
        return "size" if self.attribute == "size" else "color"

    @property
    def continuous(self) -> bool:
        """Whether the attribute goes on past the target (size, brightness) or stops there (a palette colour)."""
        return self.attribute != "color"

    @property
    def instruction(self) -> str:
        return f"make the {self.shape} {self.value}"

    def apply(self, scene: Scene) -> Scene:
        if self.attribute == "color":
            return scene.with_shape(self.shape, color=COLORS[self.value])
        if self.attribute == "brightness":
            rgb = np.asarray(scene.shape(self.shape).color, np.float64)
            rgb = rgb * DARKER if self.value == "darker" else rgb + LIGHTER * (255 - rgb)
            return scene.with_shape(self.shape, color=tuple(int(c) for c in np.round(rgb)))
        step = SIZE_STEP[self.shape] if self.value == "larger" else -SIZE_STEP[self.shape]
        return scene.with_shape(self.shape, size=scene.shape(self.shape).size + step)


SINGLE_EDITS: tuple[Edit, ...] = tuple(Edit(s, v) for s in SHAPES for v in EDIT_VALUES)
# One edit per (shape, slot): any ordered subset of these is a consistent instruction, and every source
# scene can take every one of them. The sliders are trained on these; the demo's prompt joins the first
# two, both continuous. "make the circle blue" is the colour edit: its slider suppresses, nothing more.
INDEPENDENT_EDITS: tuple[Edit, ...] = (Edit("square", "darker"), Edit("circle", "larger"),
                                       Edit("circle", "blue"), Edit("square", "smaller"))


def join_instructions(instructions: Sequence[str]) -> str:
    """"A", "B" -> "A and B"; no instructions -> the neutral prompt."""
    return JOINER.join(instructions) if instructions else NEUTRAL_PROMPT


def parse_instruction(prompt: str) -> tuple[Edit, ...]:
    """The inverse of joining: "make the square red and make the circle larger" -> its edits."""
    if prompt.strip() in ("", NEUTRAL_PROMPT):
        return ()
    by_text = {e.instruction: e for e in SINGLE_EDITS}
    edits = []
    for part in prompt.split(JOINER):
        if part.strip() not in by_text:
            raise ValueError(f"{part!r} (in {prompt!r}) is not a toy edit; known: {sorted(by_text)}")
        edits.append(by_text[part.strip()])
    return tuple(edits)


def apply_edits(scene: Scene, edits: Sequence[Edit]) -> Scene:
    touched = [(e.shape, e.slot) for e in edits]
    if len(set(touched)) != len(touched):
        raise ValueError(f"edits {[e.instruction for e in edits]} change the same attribute twice "
                         "(a shape's colour, which brightness edits change too, or its size)")
    for edit in edits:
        scene = edit.apply(scene)
    return scene


def nearest_color(rgb: Sequence[float]) -> str:
    """The palette name closest to an RGB colour."""
    return min(COLORS, key=lambda name: sum((a - b) ** 2 for a, b in zip(rgb, COLORS[name])))


# ---------------------------------------------------------------------------------------------------
# Rendering: exact area coverage, so edges are anti-aliased and sizes are continuous
# ---------------------------------------------------------------------------------------------------

def _interval_overlap(lo: float, hi: float, n: int) -> np.ndarray:
    """Length of [i, i+1] ∩ [lo, hi] for i = 0..n-1."""
    edges = np.arange(n, dtype=np.float64)
    return np.clip(np.minimum(edges + 1, hi) - np.maximum(edges, lo), 0.0, 1.0)


def coverage(shape: Shape, size: int = IMAGE_SIZE, supersample: int = 8) -> np.ndarray:
    """(size, size) fraction of each pixel the shape covers: exact for the square, the mean of
    supersample^2 sub-pixel samples for the circle."""
    x, y = shape.center
    if shape.kind == "square":
        half = shape.size / 2
        return np.outer(_interval_overlap(y - half, y + half, size), _interval_overlap(x - half, x + half, size))
    # Sample only the pixels of the bounding box: rows i0..i1-1, columns j0..j1-1.
    r = shape.size
    i0, i1 = max(0, math.floor(y - r)), min(size, math.ceil(y + r))
    j0, j1 = max(0, math.floor(x - r)), min(size, math.ceil(x + r))
    offsets = (np.arange(supersample) + 0.5) / supersample
    rows = (np.arange(i0, i1)[:, None] + offsets[None, :]).reshape(-1)  # sub-pixel sample positions
    cols = (np.arange(j0, j1)[:, None] + offsets[None, :]).reshape(-1)
    inside = (cols[None, :] - x) ** 2 + (rows[:, None] - y) ** 2 <= r ** 2
    cov = np.zeros((size, size))
    cov[i0:i1, j0:j1] = inside.reshape(i1 - i0, supersample, j1 - j0, supersample).mean(axis=(1, 3))
    return cov


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """Scene -> (size, size, 3) uint8 RGB. The shapes never overlap (each keeps to its half)."""
    image = np.broadcast_to(np.asarray(BACKGROUND, np.float64), (size, size, 3)).copy()
    for kind in SHAPES:
        shape = scene.shape(kind)
        c = coverage(shape, size)[..., None]
        image = image * (1 - c) + np.asarray(shape.color, np.float64) * c
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def render_image(scene: Scene) -> Image.Image:
    return Image.fromarray(render(scene))


# ---------------------------------------------------------------------------------------------------
# The generator: every example is a pure function of (seed, index)
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ToyExample:
    source: Scene
    edits: tuple[Edit, ...]

    @property
    def target(self) -> Scene:
        return apply_edits(self.source, self.edits)

    @property
    def instructions(self) -> list[str]:
        return [e.instruction for e in self.edits]

    @property
    def instruction(self) -> str:
        return join_instructions(self.instructions)


def random_scene(rng: np.random.Generator) -> Scene:
    """A source scene: palette colours with a little jitter, sizes from SOURCE_SIZES, jittered centres.
    Every single edit applies to every source scene (sizes leave room for one step either way)."""
    shapes = {}
    for kind in SHAPES:
        base = COLORS[list(COLORS)[rng.integers(len(COLORS))]]
        color = tuple(int(np.clip(c + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1), 0, 255)) for c in base)
        lo, hi = SOURCE_SIZES[kind]
        cx, cy = CENTER[kind]
        dx, dy = rng.integers(-CENTER_JITTER, CENTER_JITTER + 1, size=2)
        shapes[kind] = Shape(kind, color, float(round(rng.uniform(lo, hi), 2)), (cx + float(dx), cy + float(dy)))
    return Scene(**shapes)


def random_edits(rng: np.random.Generator, scene: Scene, count: int) -> tuple[Edit, ...]:
    """`count` edits (0..4) on distinct (shape, slot) pairs, in random order. A shape's colour slot takes
    a palette colour other than the shape's current one or (one time in two) a brightness step."""
    slots = [(s, a) for s in SHAPES for a in ("color", "size")]
    if not 0 <= count <= len(slots):
        raise ValueError(f"an instruction holds 0..{len(slots)} edits, got {count}")
    edits = []
    for i in rng.permutation(len(slots))[:count]:
        kind, attribute = slots[i]
        if attribute == "size":
            value = SIZE_WORDS[rng.integers(2)]
        elif rng.random() < 0.5:
            value = BRIGHTNESS_WORDS[rng.integers(2)]
        else:
            others = [c for c in COLORS if c != nearest_color(scene.shape(kind).color)]
            value = others[rng.integers(len(others))]
        edits.append(Edit(kind, value))
    return tuple(edits)


EDIT_COUNT_PROBS = (0.1, 0.5, 0.3, 0.1)  # instructions with 0, 1, 2, 3 edits


def make_example(seed: int, index: int = 0, num_edits: int | None = None) -> ToyExample:
    """Example `index` of the stream `seed`; `num_edits` None draws it from EDIT_COUNT_PROBS."""
    rng = np.random.default_rng([seed, index])
    scene = random_scene(rng)
    count = int(rng.choice(len(EDIT_COUNT_PROBS), p=EDIT_COUNT_PROBS)) if num_edits is None else num_edits
    return ToyExample(scene, random_edits(rng, scene, count))


def toy_examples(n: int, seed: int = 0, num_edits: int | None = None) -> Iterator[ToyExample]:
    for index in range(n):
        yield make_example(seed, index, num_edits)


def instruction_corpus() -> list[str]:
    """Every instruction the toy world can produce with up to two edits, plus the neutral prompt and the
    joiner: the text the tokenizers are trained on (longer joins only repeat these words)."""
    singles = [e.instruction for e in SINGLE_EDITS]
    pairs = [join_instructions([a.instruction, b.instruction]) for a in SINGLE_EDITS for b in SINGLE_EDITS
             if (a.shape, a.slot) != (b.shape, b.slot)]
    return [NEUTRAL_PROMPT, *singles, *pairs]


# ---------------------------------------------------------------------------------------------------
# Slider training data: source scenes and prompts, for train.py
# ---------------------------------------------------------------------------------------------------

def write_slider_training_folder(out: str | Path, n: int, seed: int = 1,
                                 edits: Sequence[Edit] = INDEPENDENT_EDITS) -> Path:
    """Write `n` source scenes as `images/NNNNN.png` and `metadata.jsonl`, one JSON object per image:
    {"file_name": "images/00000.png", "instruction": <1 or 2 of `edits` on distinct attributes, joined with
    " and ">, "edits": [its single instructions], "scene": <the source scene>}, and the single-edit
    prompts as `single_edit_prompts.json`. GSTLoRA trains on (file_name, instruction); STLoRA-PPS on the
    images and the single-edit prompts (with the default INDEPENDENT_EDITS any ordered subset of them is
    a consistent instruction)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(n):
        rng = np.random.default_rng([seed, index])
        scene = random_scene(rng)
        count, chosen = 1 + int(rng.integers(2)), []
        for i in rng.permutation(len(edits)):
            if len(chosen) < count and all((e.shape, e.slot) != (edits[i].shape, edits[i].slot) for e in chosen):
                chosen.append(edits[i])
        name = f"images/{index:05d}.png"
        render_image(scene).save(out / name)
        rows.append({"file_name": name, "instruction": join_instructions([e.instruction for e in chosen]),
                     "edits": [e.instruction for e in chosen], "scene": scene_to_dict(scene)})
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "single_edit_prompts.json").write_text(json.dumps([e.instruction for e in edits], indent=2) + "\n")
    return out


def scene_to_dict(scene: Scene) -> dict:
    return {kind: {"color": list(s.color), "size": s.size, "center": list(s.center)}
            for kind in SHAPES for s in [scene.shape(kind)]}


def scene_from_dict(data: dict) -> Scene:
    try:
        return Scene(**{kind: Shape(kind, tuple(int(c) for c in data[kind]["color"]), float(data[kind]["size"]),
                                    tuple(float(v) for v in data[kind]["center"])) for kind in SHAPES})
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"not a toy scene description ({type(err).__name__}: {err}): {data!r}") from None


# ---------------------------------------------------------------------------------------------------
# Attribute readers
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShapeReading:
    color: tuple[float, float, float]  # mean RGB (0..255) within CORE_RADIUS of the shape's centre
    area: float  # pixels
    size: float  # side (square: sqrt(area)) or radius (circle: sqrt(area / pi))
    centroid: tuple[float, float]  # (x, y)

    @property
    def redness(self) -> float:
        """(R - (G + B) / 2) / 255: 1 for pure red, about 0.63 for the palette red, negative for blue/green."""
        r, g, b = self.color
        return (r - (g + b) / 2) / 255


def pixel_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """A toy image, PIL or array, as the readers take it: float64 RGB of shape (IMAGE_SIZE, IMAGE_SIZE, 3)."""
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float64)
    if array.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"the readers expect a {IMAGE_SIZE}x{IMAGE_SIZE} RGB image, got an array of shape {array.shape}")
    return array


def _pixel_centers() -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float64) + 0.5
    return xs, ys


def core_color(image: Image.Image | np.ndarray, center: tuple[float, float]) -> tuple[float, float, float]:
    """Mean RGB of the pixels whose centres lie within CORE_RADIUS of `center` (always inside the shape:
    the smallest shape, a circle of radius 5, still covers them)."""
    pixels = pixel_array(image)
    xs, ys = _pixel_centers()
    core = (xs - center[0]) ** 2 + (ys - center[1]) ** 2 <= CORE_RADIUS ** 2
    return tuple(float(v) for v in pixels[core].mean(axis=0))


def shape_weights(image: Image.Image | np.ndarray, kind: str, color: Sequence[float],
                  dead_zone: float = DEAD_ZONE) -> np.ndarray:
    """(H, W) how much of each pixel of the shape's half is the shape: the pixel's step from the background
    towards `color`, as a fraction of the whole step, clipped to [0, 1]: on a render, the covered fraction
    (all zero when `color` is within MIN_CONTRAST of the background's: no shape to see).
    Fractions under `dead_zone` are dropped and the rest stretched back to [0, 1], so faint background
    noise or a slightly shifted background in a generated image adds no area. The stretch is symmetric
    about 1/2: anti-aliased edges still sum to the covered area on average, but a straight edge with a
    constant coverage under dead_zone (or over 1 - dead_zone) loses (or gains) up to dead_zone
    pixel per edge. dead_zone=0 reads the exact coverage of a render."""
    if not 0 <= dead_zone < 0.5:
        raise ValueError(f"dead_zone must be in [0, 0.5), got {dead_zone}")
    pixels = pixel_array(image)
    step = np.asarray(color, np.float64) - np.asarray(BACKGROUND, np.float64)
    if np.linalg.norm(step) < MIN_CONTRAST:  # the "shape" is the background: nothing to measure
        return np.zeros(pixels.shape[:2])
    w = np.clip((pixels - np.asarray(BACKGROUND, np.float64)) @ step / float(step @ step), 0.0, 1.0)
    w = np.clip((w - dead_zone) / (1 - 2 * dead_zone), 0.0, 1.0)
    lo, hi = HALF[kind]
    w[:, :lo] = 0.0
    w[:, hi:] = 0.0
    return w


def read_shape(image: Image.Image | np.ndarray, kind: str, center: tuple[float, float],
               dead_zone: float = DEAD_ZONE) -> ShapeReading:
    """Measure the `kind` shape of an image, knowing its centre (edits never move shapes)."""
    color = core_color(image, center)
    w = shape_weights(image, kind, color, dead_zone)
    area = float(w.sum())
    xs, ys = _pixel_centers()
    centroid = (float((w * xs).sum() / area), float((w * ys).sum() / area)) if area > 0 else center
    size = math.sqrt(area) if kind == "square" else math.sqrt(area / math.pi)
    return ShapeReading(color, area, size, centroid)


def read_scene(image: Image.Image | np.ndarray, layout: Scene) -> dict[str, ShapeReading]:
    """Both shapes of an image laid out like `layout` (e.g. the source scene of an edit)."""
    return {kind: read_shape(image, kind, layout.shape(kind).center) for kind in SHAPES}


def edit_strength(image: Image.Image | np.ndarray, source: Scene, edit: Edit) -> float:
    """How far `image` carries `edit` out on `source`: 0 = the source's attribute, 1 = the target's.

    Colour and brightness: the read colour projected on the segment source colour -> target colour.
    Size: the read size on the segment source size -> target size. Continuous; above 1 means
    exaggerated (for a colour edit, off the palette towards and past the target colour)."""
    reading = read_shape(image, edit.shape, source.shape(edit.shape).center)
    before, after = source.shape(edit.shape), edit.apply(source).shape(edit.shape)
    if edit.attribute == "size":
        return (reading.size - before.size) / (after.size - before.size)
    step = np.asarray(after.color, np.float64) - np.asarray(before.color, np.float64)
    if float(step @ step) < 1.0:
        raise ValueError(f"{edit.instruction!r} does not change this scene's {edit.shape} colour {before.color}")
    return float((np.asarray(reading.color) - np.asarray(before.color, np.float64)) @ step / float(step @ step))
