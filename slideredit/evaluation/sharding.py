"""Cells of sweeps split over the processes torchrun starts, and resumed after a kill.

    torchrun --nproc_per_node N eval.py --model ... --cases FILE ...    (infer.py: one sweep's cells)

Without torchrun (or with one process) everything runs in this process. With N processes, rank r
renders items r, r + N, r + 2N, ... of the same list, each on its own GPU (LOCAL_RANK) or the CPU
(gloo). After each round of N items rank 0 gathers the results (gather_object) and alone writes them,
in the list's order: the files are those one process writes, and the output folder only has to exist
where rank 0 runs. Every rendered item is the same pipeline call one process makes (same cell, same
seed, same batch), so on identical devices the images are identical.

A killed evaluation resumes: rank 0 writes each cell atomically and then records it in a manifest
(CellManifest) with a key of everything the image was made from; a rerun renders only the cells whose
file and key are not both there, whatever the number of processes. (infer.py keeps a sweep's cells and
manifest in a hidden work folder beside its --out, .NAME.partial, until the sweep is complete.)
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import torch.distributed as dist

from ..atomic import atomic_path
from ..training.distributed import Distributed

Item = TypeVar("Item")
Result = TypeVar("Result")


def rank_device(device: str, ranks: Distributed) -> str:
    """The device of this rank: under torchrun a plain "cuda" becomes this rank's GPU (cuda:LOCAL_RANK), so
    N processes use N GPUs instead of all sharing the first; an explicit index or another device is kept."""
    return str(ranks.device) if device == "cuda" and ranks.enabled and ranks.device.type == "cuda" else device


def from_main(value: object, ranks: Distributed) -> object:
    """Rank 0's `value` on every rank (e.g. what is left to render, decided by rank 0 from its manifest)."""
    if not ranks.enabled:
        return value
    box = [value if ranks.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def render_in_rounds(items: list[Item], render: Callable[[Item], Result],
                     ranks: Distributed) -> Iterator[tuple[Item, Result]]:
    """Render items[r], items[r + N], ... on rank r; yield on rank 0 every item with its result, in the
    list's order, one round of N at a time (nothing on the other ranks). Every rank must run the loop to
    its end: each round is a collective (gather_object)."""
    for start in range(0, len(items), ranks.world_size):
        round_items = items[start:start + ranks.world_size]
        mine = start + ranks.rank
        result = render(items[mine]) if mine < len(items) else None
        if not ranks.enabled:
            yield round_items[0], result
            continue
        gathered = [None] * ranks.world_size if ranks.is_main else None
        dist.gather_object(result, gathered, dst=0)
        if ranks.is_main:
            yield from zip(round_items, gathered)


def digest(value: object) -> str:
    """A short stable key for a JSON-able value (a cell's settings)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """The digest of a file's bytes, or of every file in a folder (names and bytes): a retrained adapter
    at the same path is a different one."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    sha = hashlib.sha256()
    for file in files:
        sha.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                sha.update(block)
    return sha.hexdigest()[:16]


class CellManifest:
    """The cells a run has finished: {"cells": {file relative to the manifest's folder: key}}.

    Rank 0 alone reads and writes it. A cell counts as done only when its file exists and was recorded
    with the key it would be made with now, so changing the seed, the steps, the adapter's bytes or a
    case's image or prompt between a kill and the rerun renders the cell again."""

    def __init__(self, path: Path):
        self.path = path
        self.cells: dict[str, str] = self._read() if path.is_file() else {}

    def _read(self) -> dict[str, str]:
        try:
            record = json.loads(self.path.read_text(encoding="utf-8"))
            cells = record["cells"]
            if not isinstance(cells, dict) or not all(isinstance(k, str) for k in cells.values()):
                raise TypeError("cells must map file names to keys")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{self.path} is not a cell manifest ({err}); delete it to render every cell "
                             "again") from None
        return cells

    def is_done(self, name: str, key: str) -> bool:
        return self.cells.get(name) == key and (self.path.parent / name).is_file()

    def record(self, name: str, key: str) -> None:
        """Add a cell whose file is written; the manifest is replaced atomically."""
        self.cells[name] = key
        with atomic_path(self.path) as temp:
            temp.write_text(json.dumps({"cells": self.cells}, indent=1) + "\n", encoding="utf-8")
