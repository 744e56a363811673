"""Training data: source images and the instructions that edit them.

Two kinds of dataset, one interface (`len`, `raw_image(i)` -> encoded file bytes, `instructions(i, rng)`):

- `InstructionEditDataset`: rows with an image and an edit instruction (HQ-Edit: `input_image`, `edit`),
  read from a folder with a `metadata.jsonl`/`.csv` (as Hugging Face's imagefolder), a JSONL/CSV/parquet
  file, or a hub dataset (the optional `datasets` package).
- `ImageFolderDataset`: a folder of images; each sample's prompt is 1..n single edits from the config's
  list, drawn as from the release's list of all their ordered permutations (PPS).

Images are kept as encoded bytes until needed: their hash keys the latent cache, so a cached image is
never decoded. Unreadable images raise `UnreadableImage`; the training loop skips and counts them.

The sample order is a function of (seed, sample number) only: pass e over the data is a permutation
seeded by (seed, e), and each sample's own random choices come from a generator seeded by (seed,
sample number). Any process can then build any sample of the global batch, whatever the world size,
and a resumed run needs only the number of samples already drawn.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..image import to_rgb
from .config import TrainConfig

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
TABLE_SUFFIXES = (".jsonl", ".csv", ".parquet")
IMAGEFOLDER_COLUMN = "file_name"  # the image column of a Hugging Face imagefolder's metadata


class DataError(ValueError):
    """A dataset that cannot be trained on (missing, empty, every image unreadable, bad columns)."""


class UnreadableImage(Exception):
    """One image that cannot be read or decoded: skipped and counted, never fatal on its own."""


# ---------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------

def decode_image(raw: bytes) -> Image.Image:
    """Encoded file bytes -> RGB image (EXIF orientation applied); UnreadableImage if Pillow cannot."""
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
    except UnidentifiedImageError:
        raise UnreadableImage("not an image file Pillow can read") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:  # truncated, corrupt
        raise UnreadableImage(f"{type(err).__name__}: {err}") from None


def center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Shorter side resized to `resolution` (LANCZOS), then the central resolution x resolution square."""
    scale = resolution / min(image.size)
    width, height = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
    image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    left, top = (width - resolution) // 2, (height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def to_pixels(image: Image.Image) -> torch.Tensor:
    """RGB image -> (3, H, W) float32 in [-1, 1], the autoencoder's input."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    return (2 * pixels - 1).permute(2, 0, 1).contiguous()


def encoded_bytes(value, root: Path) -> bytes:
    """An image cell as encoded bytes: a path (relative to `root`), raw bytes, a {"bytes", "path"} dict
    (Hugging Face's Image feature undecoded, or a parquet export of it) or a PIL image."""
    if isinstance(value, Mapping):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue()
    if isinstance(value, (str, Path)) and str(value):
        path = root / Path(value).expanduser()
        try:
            return path.read_bytes()
        except OSError as err:
            raise UnreadableImage(f"cannot read {path} ({type(err).__name__}: {err.strerror or err})") from None
    raise UnreadableImage(f"not an image: {type(value).__name__} {str(value)[:60]!r}")


# ---------------------------------------------------------------------------------------------------
# (a) Instruction-editing rows
# ---------------------------------------------------------------------------------------------------

class InstructionEditDataset:
    """Rows holding a source image and one edit instruction. `rows` is any indexable sequence of
    mappings (a list of dicts, or a Hugging Face Dataset)."""

    def __init__(self, rows: Sequence[Mapping], image_column: str, instruction_column: str, root: Path,
                 source: str, indices: list[int]):
        self.rows, self.image_column, self.instruction_column = rows, image_column, instruction_column
        self.root, self.source = root, source
        self.indices = indices  # rows with a usable instruction
        if not indices:
            raise DataError(f"{source}: the dataset is empty (no row with an image and a non-empty "
                            f"{instruction_column!r} instruction)")

    def __len__(self) -> int:
        return len(self.indices)

    def raw_image(self, i: int) -> bytes:
        return encoded_bytes(self.rows[self.indices[i]][self.image_column], self.root)

    def instructions(self, i: int, rng: random.Random) -> tuple[str, ...]:
        return (self.rows[self.indices[i]][self.instruction_column].strip(),)

    def describe(self, i: int) -> str:
        value = self.rows[self.indices[i]][self.image_column]
        where = f" ({value})" if isinstance(value, (str, Path)) else ""
        return f"{self.source} row {self.indices[i]}{where}"


def instruction_rows(rows: Sequence[Mapping], instruction_column: str) -> list[int]:
    """Indices of the rows whose instruction is a non-empty string."""
    return [i for i, row in enumerate(rows) if isinstance(row.get(instruction_column), str)
            and row[instruction_column].strip()]


def check_columns(columns: Sequence[str], wanted: Sequence[str], source: str) -> None:
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise DataError(f"{source}: no column(s) {missing}; the columns are {list(columns)}. Set image_column / "
                        "instruction_column in the config to the names this dataset uses")


def read_table(path: Path) -> list[dict]:
    """The rows of a JSONL, CSV or parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}, line {number}: not valid JSON ({err})") from None
                if not isinstance(rows[-1], dict):
                    raise DataError(f"{path}, line {number}: expected a JSON object (one row), got {line[:60]!r}")
        return rows
    if suffix == ".csv":
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    if suffix == ".parquet":
        return read_parquet(path)
    raise DataError(f"{path}: unsupported table format {suffix!r}; use .jsonl, .csv or .parquet")


def read_parquet(path: Path) -> list[dict]:
    """pyarrow (or pandas) is optional: imported only when a parquet file is given."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        try:
            import pandas as pd
        except ImportError:
            raise DataError(f"{path}: reading parquet needs pyarrow (or pandas): pip install pyarrow") from None
        return pd.read_parquet(path).to_dict("records")
    return pq.read_table(path).to_pylist()


def local_edit_rows(path: Path) -> tuple[list[dict], Path]:
    """(rows, folder that relative image paths start from) of a table file or an imagefolder."""
    if path.is_file():
        return read_table(path), path.parent
    for name in METADATA_FILES:
        if (path / name).is_file():
            return read_table(path / name), path
    raise DataError(f"{path}: a folder dataset needs a {' or '.join(METADATA_FILES)} with one row per image "
                    f"({IMAGEFOLDER_COLUMN!r} or the image column, and the instruction column)")


def hub_edit_rows(name: str, image_column: str, instruction_column: str):
    """A hub dataset's train split, its image column left undecoded (bytes): the `datasets` package is
    optional and imported only here."""
    not_local = f"dataset_name not found: {name} is no local file or folder (looked in {Path.cwd()})"
    try:
        import datasets
    except ImportError:
        raise DataError(f"{not_local}, and reading it as a Hugging Face hub dataset needs the `datasets` package: "
                        "pip install datasets") from None
    try:
        rows = datasets.load_dataset(name, split="train")
    except Exception as err:  # the hub client raises many types; one readable line instead
        raise DataError(f"{not_local}, and the hub dataset cannot be loaded ({type(err).__name__}: {err})") from None
    check_columns(rows.column_names, [image_column, instruction_column], name)
    rows = rows.select_columns([image_column, instruction_column])
    if isinstance(rows.features[image_column], datasets.Image):
        rows = rows.cast_column(image_column, datasets.Image(decode=False))  # bytes: hashed, decoded on demand
    return rows


def looks_local(name: str) -> bool:
    """Whether a dataset name can only be a path: hub ids are `name` or `owner/name`, so anything absolute,
    starting with `.` or `~`, deeper than owner/name, naming a table file, or whose first folder exists
    here is meant as a local file or folder."""
    parts = Path(name).parts
    return (name.startswith((".", "~", "/", "\\")) or len(parts) > 2 or Path(name).suffix.lower() in TABLE_SUFFIXES
            or (len(parts) == 2 and Path(parts[0]).is_dir()))


def not_found(field: str, name: str) -> DataError:
    where = "" if Path(name).expanduser().is_absolute() else f" (relative to the current directory {Path.cwd()})"
    return DataError(f"{field} not found: {name}{where}")


def open_edit_dataset(name: str, image_column: str, instruction_column: str) -> InstructionEditDataset:
    path = Path(name).expanduser()
    if not path.exists() and looks_local(name):
        raise not_found("dataset_name", name)
    if path.exists():
        rows, root = local_edit_rows(path)
        columns = set().union(*(row.keys() for row in rows)) if rows else set()
        if image_column not in columns and IMAGEFOLDER_COLUMN in columns:
            image_column = IMAGEFOLDER_COLUMN
        if rows:
            check_columns(sorted(columns), [image_column, instruction_column], str(path))
        indices = instruction_rows(rows, instruction_column)
    else:
        rows, root = hub_edit_rows(name, image_column, instruction_column), Path.cwd()
        indices = [i for i, text in enumerate(rows[instruction_column]) if isinstance(text, str) and text.strip()]
    return InstructionEditDataset(rows, image_column, instruction_column, root, str(name), indices)


# ---------------------------------------------------------------------------------------------------
# (b) A folder of images + single edits combined by PPS
# ---------------------------------------------------------------------------------------------------

def draw_instructions(edits: Sequence[str], max_n: int, rng: random.Random) -> tuple[str, ...]:
    """An ordered draw of 1..max_n distinct single edits, uniform over all such ordered tuples (the
    release samples from the list of every permutation of length 1..max_n): the length n is drawn with
    weight P(m, n) = m! / (m - n)!, then an ordered sample of n edits."""
    lengths = range(1, min(max_n, len(edits)) + 1)
    n = rng.choices(lengths, weights=[math.perm(len(edits), n) for n in lengths])[0]
    return tuple(rng.sample(list(edits), n))


class ImageFolderDataset:
    def __init__(self, folder: Path, edits: Sequence[str], max_instructions: int):
        if not folder.exists():
            raise not_found("images_dataset_path", str(folder))
        if not folder.is_dir():
            raise DataError(f"images_dataset_path {folder} is not a folder")
        self.folder, self.edits, self.max_instructions = folder, list(edits), max_instructions
        self.files = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                            and p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
        if not self.files:
            raise DataError(f"images_dataset_path {folder}: the dataset is empty (no image files with an extension "
                            f"in {sorted(IMAGE_EXTENSIONS)})")

    def __len__(self) -> int:
        return len(self.files)

    def raw_image(self, i: int) -> bytes:
        return encoded_bytes(self.files[i], self.folder)

    def instructions(self, i: int, rng: random.Random) -> tuple[str, ...]:
        return draw_instructions(self.edits, self.max_instructions, rng)

    def describe(self, i: int) -> str:
        return str(self.folder / self.files[i])


def open_dataset(config: TrainConfig) -> InstructionEditDataset | ImageFolderDataset:
    if config.images_dataset_path is not None:
        return ImageFolderDataset(Path(config.images_dataset_path).expanduser(), config.training_single_edit_prompts,
                                  config.max_num_instructions_per_prompt)
    return open_edit_dataset(config.dataset_name, config.image_column, config.instruction_column)


# ---------------------------------------------------------------------------------------------------
# Order and per-sample randomness: functions of (seed, sample number)
# ---------------------------------------------------------------------------------------------------

def derived_seed(seed: int, *key) -> int:
    """A 63-bit seed for one named stream, e.g. ("sample", 17): independent of every other key."""
    digest = hashlib.sha256(":".join(map(str, (seed, *key))).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class DataOrder:
    """Sample s is item perm_e[s mod n] of pass e = s // n, perm_e a shuffle seeded by (seed, e)."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self._epoch, self._perm = -1, []

    def index(self, sample: int) -> int:
        epoch = sample // self.size
        if epoch != self._epoch:
            self._perm = list(range(self.size))
            random.Random(derived_seed(self.seed, "order", epoch)).shuffle(self._perm)
            self._epoch = epoch
        return self._perm[sample % self.size]
