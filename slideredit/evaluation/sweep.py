"""The sweep folder: the images of one slider sweep and a record of how they were made.

infer.py writes one folder per sweep; eval.py reads it. Layout:

    folder/sweep.json     the record below
    folder/source.png     the source image (copied in; any name, given by "source_image")
    folder/cells/*.png    one image per cell of the sweep
    folder/grid.png, folder/sweep.gif   previews (not read by eval.py)

sweep.json:

    {"source_image": "source.png",          # paths are relative to the folder
     "prompt": "make the hair curly and add a smile",
     "subprompts": ["make the hair curly", "add a smile"] or null,
     "seed": 0, "method": "gstlora" | "stlora" | "base",
     "model": "black-forest-labs/FLUX.1-Kontext-dev" or "../../assets/toy-kontext",
     "steps": 28, "guidance": 2.5,
     "cells": [{"alphas": [-1.0, 0.0], "image": "cells/a-1.00_b+0.00.png"}, ...]}

A cell has one alpha per slider: len(subprompts) sliders for "stlora", one for "gstlora" and "base".
The model is a hub id as given, or a local model folder recorded relative to the sweep folder (always
starting with ./ or ../): a sweep moved or shared together with its model still finds it, and the
record holds no absolute path of the machine that made it. read_sweep resolves such a path again.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..atomic import atomic_path

SWEEP_FILE = "sweep.json"
METHODS = ("gstlora", "stlora", "base")


class SweepFormatError(ValueError):
    """A sweep folder or its sweep.json does not follow the format above."""


@dataclass(frozen=True)
class SweepCell:
    alphas: tuple[float, ...]  # one per slider
    image: str                 # relative to the sweep folder


@dataclass
class Sweep:
    source_image: str
    prompt: str
    subprompts: list[str] | None
    seed: int
    method: str
    model: str
    steps: int
    guidance: float
    cells: list[SweepCell] = field(default_factory=list)

    @property
    def num_sliders(self) -> int:
        return len(self.subprompts) if self.method == "stlora" else 1


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _from_record(record: object, where: str) -> Sweep:
    """Check a parsed sweep.json and turn it into a Sweep; every problem names `where` and the field."""
    if not isinstance(record, dict):
        raise SweepFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    required = ("source_image", "prompt", "subprompts", "seed", "method", "model", "steps", "guidance", "cells")
    missing = [key for key in required if key not in record]
    if missing:
        raise SweepFormatError(f"{where}: missing field(s) {', '.join(missing)}")
    for key in ("source_image", "prompt", "model"):
        if not isinstance(record[key], str):
            raise SweepFormatError(f"{where}: {key} must be a string, got {record[key]!r}")
    for key in ("seed", "steps"):
        if not isinstance(record[key], int) or isinstance(record[key], bool):
            raise SweepFormatError(f"{where}: {key} must be an integer, got {record[key]!r}")
    if not _is_number(record["guidance"]):
        raise SweepFormatError(f"{where}: guidance must be a number, got {record['guidance']!r}")
    if record["method"] not in METHODS:
        raise SweepFormatError(f"{where}: method must be one of {', '.join(METHODS)}, got {record['method']!r}")
    subprompts = record["subprompts"]
    if subprompts is not None and (not isinstance(subprompts, list) or not subprompts
                                   or not all(isinstance(text, str) for text in subprompts)):
        raise SweepFormatError(f"{where}: subprompts must be null or a non-empty list of strings, got {subprompts!r}")
    if record["method"] == "stlora" and subprompts is None:
        raise SweepFormatError(f"{where}: method 'stlora' needs subprompts (one slider per sub-prompt)")
    sweep = Sweep(source_image=record["source_image"], prompt=record["prompt"], subprompts=subprompts,
                  seed=record["seed"], method=record["method"], model=record["model"], steps=record["steps"],
                  guidance=float(record["guidance"]))
    if not isinstance(record["cells"], list) or not record["cells"]:
        raise SweepFormatError(f"{where}: cells must be a non-empty list")
    for index, cell in enumerate(record["cells"]):
        if not (isinstance(cell, dict) and isinstance(cell.get("image"), str) and isinstance(cell.get("alphas"), list)):
            raise SweepFormatError(f"{where}: cells[{index}] must be {{\"alphas\": [numbers], \"image\": path}}, "
                                   f"got {cell!r}")
        if len(cell["alphas"]) != sweep.num_sliders or not all(_is_number(a) for a in cell["alphas"]):
            raise SweepFormatError(f"{where}: cells[{index}].alphas must be {sweep.num_sliders} finite number(s) "
                                   f"(one per slider of method {sweep.method!r}), got {cell['alphas']!r}")
        sweep.cells.append(SweepCell(alphas=tuple(float(a) for a in cell["alphas"]), image=cell["image"]))
    return sweep


def recorded_model(model: str, folder: Path) -> str:
    """How sweep.json records `model`: an existing local path (absolute, or relative to the working
    directory) becomes relative to `folder`, starting with ./ or ../; anything else (a hub id) stays as given."""
    path = Path(model).expanduser()
    if not path.exists():
        return model
    try:
        relative = Path(os.path.relpath(path.resolve(), folder.resolve())).as_posix()
    except ValueError:  # another drive (Windows): there is no relative path
        return model
    return relative if relative == ".." or relative.startswith("../") else f"./{relative}"


def resolved_model(model: str, folder: Path) -> str:
    """The model of a record as a path usable from anywhere: a recorded relative path that exists from
    `folder` is resolved there; a hub id, an absolute path (older records) or a model folder that did not
    move along with the sweep stay as recorded."""
    if model.startswith(("./", "../")) and (folder / model).exists():
        return str((folder / model).resolve())
    return model


def _check_files(folder: Path, sweep: Sweep) -> None:
    named = [("source_image", sweep.source_image)] + [(f"cells[{i}].image", c.image) for i, c in enumerate(sweep.cells)]
    for name, path in named:
        if not (folder / path).is_file():
            raise FileNotFoundError(f"{folder / SWEEP_FILE}: {name} {path!r} does not exist in {folder}")


def read_sweep(folder: str | os.PathLike) -> Sweep:
    """Read and check folder/sweep.json; every image it names must exist. Image paths stay relative to
    `folder`; a model folder recorded relative to it is resolved (resolved_model)."""
    folder = Path(folder)
    path = folder / SWEEP_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a sweep folder: it has no {SWEEP_FILE} (infer.py writes one)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SweepFormatError(f"{path}: not valid JSON ({err})") from None
    sweep = _from_record(record, str(path))
    _check_files(folder, sweep)
    sweep.model = resolved_model(sweep.model, folder)
    return sweep


def write_sweep(folder: str | os.PathLike, sweep: Sweep) -> Path:
    """Write folder/sweep.json for images already saved in `folder`; return its path.

    The record is checked as read_sweep would check it, then written to a temporary file in the same
    folder and renamed over sweep.json (os.replace), so a reader never sees a half-written record. A
    local model folder is recorded relative to `folder` (recorded_model).
    """
    folder = Path(folder)
    record = asdict(sweep)
    record["model"] = recorded_model(sweep.model, folder)
    record["cells"] = [{"alphas": list(cell.alphas), "image": cell.image} for cell in sweep.cells]
    _from_record(record, f"write_sweep({folder})")
    _check_files(folder, sweep)
    with atomic_path(folder / SWEEP_FILE) as temp, open(temp, "w", encoding="utf-8") as file:
        json.dump(record, file, indent=2)
        file.write("\n")
    return folder / SWEEP_FILE
