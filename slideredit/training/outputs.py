"""What a training run writes under `output_dir`, so that a new run never mixes with an earlier one.

A run writes exactly these entries (and nothing else) under output_dir:

    checkpoint-N/                 every checkpointing_steps steps (checkpoints.py)
    pytorch_lora_weights.safetensors | selective_lora.safetensors     the final adapter
    config.yaml, train.log
    validation/step-N.png         validation grids

and, where a write was killed, the hidden temporary beside a checkpoint, the adapter or a grid
(slideredit.atomic's names: `.checkpoint-N.1a2b3c4d.tmp`, `validation/.step-N.1a2b3c4d.png.tmp`).

A fresh run (resume_from_checkpoint not set) refuses an output_dir holding an earlier run's results
(checkpoints, a final adapter, validation grids): `--resume latest` continues that run, `--overwrite`
removes the entries above, once the new run's data and model have loaded (a run that cannot start
leaves the earlier one as it was). Anything else in output_dir is the user's and is never touched: a
`checkpoint-N` file, or a `checkpoint-N` folder without training_state.pt, is not a checkpoint.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from ..atomic import leftover_pattern
from ..slider_checkpoints import FILE_NAMES
from ..sliders import GSTLORA, STLORA
from .checkpoints import STATE_FILE
from .config import ConfigError, TrainConfig

ADAPTER_FILES = (FILE_NAMES[GSTLORA][0], FILE_NAMES[STLORA][0])  # what save_adapter writes
RUN_FILES = ("config.yaml", "train.log")
VALIDATION_DIR = "validation"
_CHECKPOINT = re.compile(r"checkpoint-\d+")
_GRID = re.compile(r"step-\d+\.png")
_LEFTOVER = re.compile("|".join([leftover_pattern(r"checkpoint-\d+"), *(
    leftover_pattern(re.escape(Path(name).stem), re.escape(Path(name).suffix)) for name in ADAPTER_FILES)]))
_GRID_LEFTOVER = re.compile(leftover_pattern(r"step-\d+", r"\.png"))


class OutputDirError(ConfigError):
    """output_dir holds an earlier run that this one would overwrite or mix with."""


def _is_checkpoint(path: Path) -> bool:
    """A complete checkpoint-N/: the folder holds a training state."""
    return _CHECKPOINT.fullmatch(path.name) is not None and (path / STATE_FILE).is_file()


def _grids(output_dir: Path, include_leftovers: bool) -> list[Path]:
    """validation/step-N.png files (and the temporaries of interrupted writes of them)."""
    folder = output_dir / VALIDATION_DIR
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.is_file() and (
        _GRID.fullmatch(p.name) or (include_leftovers and _GRID_LEFTOVER.fullmatch(p.name)))]


def results(output_dir: str | Path) -> list[Path]:
    """An earlier run's results under output_dir: checkpoint folders, final adapters, validation grids."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if _is_checkpoint(p)]
    found += [out / name for name in ADAPTER_FILES if (out / name).is_file()]
    return sorted(found + _grids(out, include_leftovers=False), key=_natural)


def run_entries(output_dir: str | Path) -> list[Path]:
    """Every entry a run writes that exists under output_dir (what --overwrite removes)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    entries = [p for p in out.iterdir() if _is_checkpoint(p) or _LEFTOVER.fullmatch(p.name)]
    entries += [out / name for name in ADAPTER_FILES + RUN_FILES if (out / name).is_file()]
    return sorted(entries + _grids(out, include_leftovers=True), key=_natural)


def _natural(path: Path) -> tuple:
    """checkpoint-4 before checkpoint-10."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path)))


def _summary(paths: list[Path], out: Path, limit: int = 6) -> str:
    names = [str(p.relative_to(out)) for p in paths]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_output_dir(config: TrainConfig, overwrite: bool) -> None:
    """Refuse a fresh run over an earlier one (unless it is to be overwritten), and --overwrite together
    with --resume of a checkpoint it would remove."""
    out = Path(config.output_dir)
    resume = config.resume_from_checkpoint
    if overwrite and resume not in (None, "latest"):
        resumed = Path(resume).expanduser().resolve()
        if out.resolve() in (resumed, *resumed.parents):
            raise OutputDirError(f"--overwrite would remove the checkpoint that --resume names ({resume}): "
                                 "give one of the two")
    earlier = results(out)
    if earlier and resume is None and not overwrite:
        raise OutputDirError(
            f"output_dir {out} already holds an earlier run ({_summary(earlier, out)}). Continue it with "
            f"--resume latest, replace it with --overwrite (removes its checkpoints, final adapter, config.yaml, "
            f"train.log and validation grids; nothing else), or choose another output_dir")


def clear_output_dir(output_dir: str | Path) -> list[Path]:
    """Remove every entry a run writes under output_dir (run_entries) and nothing else; -> those removed."""
    removed = run_entries(output_dir)
    for path in removed:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    validation = Path(output_dir) / VALIDATION_DIR
    if validation.is_dir() and not any(validation.iterdir()):
        validation.rmdir()
    return removed
