"""Training checkpoints: `output_dir/checkpoint-N/`, written so that a kill never leaves half of one.

    checkpoint-N/
        pytorch_lora_weights.safetensors (GSTLoRA) | selective_lora.safetensors (STLoRA)
            the adapter in the release's naming: `pipe.load_gstlora(folder)` / `pipe.load_stlora(folder)`
        training_state.pt
            plain tensors, numbers and dicts (read back with weights_only=True): the step, the number of
            samples drawn (the data order position), the optimizer state, the RNG states, and the
            images found unreadable so far

The folder is written under a hidden temporary name beside it and renamed into place (os.replace of
the folder): a run killed while saving leaves the previous checkpoints intact and no `checkpoint-N`.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..atomic import atomic_folder
from ..checkpoint import CheckpointError
from ..slider_checkpoints import save_adapter
from ..transformer import Flux

STATE_FILE = "training_state.pt"
_NAME = re.compile(r"checkpoint-(\d+)")


def checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under output_dir as (step, folder), oldest first."""
    folder = Path(output_dir)
    found = []
    if folder.is_dir():
        for path in folder.iterdir():
            m = _NAME.fullmatch(path.name)
            if m and (path / STATE_FILE).is_file():
                found.append((int(m.group(1)), path))
    return sorted(found)


def resolve_resume(output_dir: str | os.PathLike, resume: str | None) -> Path | None:
    """`resume_from_checkpoint`: None, "latest" (the newest checkpoint, or None when there is none yet: a
    fresh start) or a checkpoint folder."""
    if resume is None:
        return None
    if resume == "latest":
        found = checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"resume_from_checkpoint {resume}: not a training checkpoint folder (no {STATE_FILE} "
                              f"in {path}); give a checkpoint-N folder or 'latest'")
    return path


def save_checkpoint(output_dir: str | os.PathLike, step: int, model: Flux, method: str, state: dict,
                    parameters: dict[str, Tensor] | None = None) -> Path:
    """Write checkpoint-{step} atomically; an existing checkpoint of that step (a resumed run passing the
    same step again) is replaced. `parameters`: the adapter's whole tensors when the model holds shards
    (slider_checkpoints.save_adapter)."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    with atomic_folder(final) as tmp:  # a hidden .checkpoint-N.*.tmp until complete
        save_adapter(model, method, tmp, parameters)
        torch.save(state, tmp / STATE_FILE)
    return final


def load_training_state(folder: str | os.PathLike) -> dict:
    path = Path(folder) / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler raises many types; one readable line instead
        raise CheckpointError(f"{path}: cannot read this training state ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or not {"step", "samples", "optimizer", "rng"} <= set(state):
        raise CheckpointError(f"{path}: not a slideredit training state (missing step/samples/optimizer/rng)")
    return state


def prune_checkpoints(output_dir: str | os.PathLike, keep: int, newest: int) -> list[Path]:
    """Delete all but the `keep` latest checkpoints up to step `newest` (the one just written); -> the folders
    removed. Checkpoints of later steps are not this run's past (a run resumed from an earlier checkpoint
    passes them again, replacing each): they are neither counted nor deleted."""
    old = [path for step, path in checkpoints(output_dir) if step <= newest][:-keep]
    for path in old:
        shutil.rmtree(path)
    return old


# ---------------------------------------------------------------------------------------------------
# Global RNG states, as tensors (torch.load(weights_only=True) reads plain tensors, numbers and dicts)
# ---------------------------------------------------------------------------------------------------

def global_rng_state() -> dict:
    """torch (CPU and the current CUDA device), numpy and Python `random` global generators."""
    version, internal, gauss_next = random.getstate()
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_global_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
