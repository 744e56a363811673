"""The toy sliders' training data: held-apart source scenes from the toy generator, and nothing else.

    python -m slideredit.toy.slider_data                  # -> data/toy-sliders (512 scenes)
    python train.py --config assets/toy-kontext/sliders/stlora/train_config.yaml

Writes `images/NNNNN.png`, `metadata.jsonl` (GSTLoRA's rows: file_name, instruction) and
`single_edit_prompts.json` (shapes.write_slider_training_folder). The scenes are a function of
(SLIDER_DATA_SEED, scene number), so 512 scenes are exactly the data the shipped sliders were trained
on, and the shipped `train_config.yaml` files read this folder: run both commands from the repository
root (relative paths in a training config are relative to the directory train.py runs from).

The folder is written beside --out under a hidden name and renamed into place; an earlier toy data
folder there is replaced, any other non-empty folder is refused.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..atomic import atomic_folder
from .shapes import write_slider_training_folder

DEFAULT_OUT = Path("data/toy-sliders")
SCENES = 512  # what the shipped sliders were trained on
SLIDER_DATA_SEED = 30_000  # the sliders' scenes: a stream of their own, apart from the base model's
DATA_FILES = {"images", "metadata.jsonl", "single_edit_prompts.json"}


def write_slider_data(out: str | os.PathLike = DEFAULT_OUT, scenes: int = SCENES) -> Path:
    """Write `scenes` toy scenes to `out` (replacing an earlier toy data folder there); -> out."""
    out = Path(out)
    if scenes < 1:
        raise ValueError(f"scenes must be at least 1, got {scenes}")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and {p.name for p in out.iterdir()} != DATA_FILES)):
        raise FileExistsError(f"{out} exists and is not a toy slider data folder; choose another --out")
    with atomic_folder(out) as tmp:
        write_slider_training_folder(tmp, scenes, seed=SLIDER_DATA_SEED)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the data folder (default: {DEFAULT_OUT})")
    parser.add_argument("--scenes", type=int, default=SCENES, help=f"source scenes (default: {SCENES})")
    args = parser.parse_args(argv)
    try:
        out = write_slider_data(args.out, args.scenes)
    except (ValueError, OSError) as err:
        parser.exit(2, f"error: {err}\n")
    print(f"wrote {args.scenes} toy scenes to {out}")
    return out


if __name__ == "__main__":
    main()
