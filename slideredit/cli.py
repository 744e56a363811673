"""Command-line helpers shared by infer.py, eval.py and train.py.

Nothing here imports torch: the scripts parse (and reject) their arguments before the slow imports.
"""
from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path

ALPHA_FLAGS = ("--alphas", "--slider-alphas")
_SEPARATOR = re.compile(r"\s*,\s*|\s+")  # a comma (spaces around it allowed) or plain spaces


def parse_alphas(text: str, minimum: int = 1, flag: str = "--alphas", distinct: bool = True) -> list[float]:
    """"-1,-0.5,0,0.5,1" or "-1 -0.5 0 0.5 1" -> finite slider values (at least `minimum`, no repeats
    when `distinct`). An empty entry ("1,,2", a trailing comma) is an error, not skipped."""
    parts = _SEPARATOR.split(text.strip())
    if any(part == "" for part in parts):
        raise argparse.ArgumentTypeError(f"{flag} has an empty entry in {text!r}: give numbers separated by "
                                         f"commas or spaces, such as -1,-0.5,0,0.5,1")
    try:
        alphas = [float(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag} must be comma-separated numbers such as -1,-0.5,0,0.5,1, "
                                         f"got {text!r}") from None
    bad = [part for part, alpha in zip(parts, alphas) if not math.isfinite(alpha)]
    if bad:
        raise argparse.ArgumentTypeError(f"{flag} must be finite numbers, got {bad[0]!r} in {text!r}")
    if len(alphas) < minimum:
        raise argparse.ArgumentTypeError(f"{flag} needs at least {minimum} value(s), got {text!r}")
    repeated = sorted({alpha for alpha in alphas if alphas.count(alpha) > 1})
    if distinct and repeated:
        raise argparse.ArgumentTypeError(f"{flag} lists {repeated[0]:g} more than once ({text!r}): each value is "
                                         f"one cell of the sweep, give each once")
    return alphas


def _is_value(arg: str) -> bool:
    """A command-line word that is a value, not a flag: '-1' and '-.5' are numbers, '-h' and '--out' flags."""
    return not arg.startswith("-") or (len(arg) > 1 and (arg[1].isdigit() or arg[1] == "."))


def join_alphas(argv: list[str], flags: tuple[str, ...] = ALPHA_FLAGS) -> list[str]:
    """`--alphas -1 0 1` / `--alphas -1,-0.5,0` -> `--alphas=-1 0 1` / `--alphas=-1,-0.5,0`.

    argparse would take a value starting with '-' for a flag (it only knows plain negative numbers), so
    every value word after an alpha flag is glued to it; parse_alphas then splits on commas and spaces."""
    out: list[str] = []
    values: list[str] | None = None  # the words collected for the flag at out[-1]
    for arg in argv:
        if values is not None and _is_value(arg):
            values.append(arg)
            continue
        if values:
            out[-1] = f"{out[-1]}={' '.join(values)}"
        values = [] if arg in flags else None
        out.append(arg)
    if values:
        out[-1] = f"{out[-1]}={' '.join(values)}"
    return out


def finite_float(text: str) -> float:
    """argparse type: a finite number (rejects nan and inf, which would silently give a black image)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def nearest_existing(path: Path) -> Path:
    """`path` itself or its closest ancestor that exists (the folder a new file or folder would go into)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def writable_problem(path: Path) -> str | None:
    """Why `path` could not be created (a file where a folder must be, no permission), or None."""
    base = nearest_existing(path.parent)
    if not base.is_dir():
        return f"{base} is a file, not a folder"
    if not os.access(base, os.W_OK | os.X_OK):
        return f"cannot write into {base} (permission denied)"
    return None


def torchrun_rank() -> tuple[int, int]:
    """(this process's rank, the number of processes) as torchrun sets them, (0, 1) without torchrun; read
    from the environment, so the scripts can check their arguments per rank before torch is imported."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
