"""Command-line helpers shared by infer.py, eval.py and train.py."""
from __future__ import annotations

import argparse
import math


def parse_alphas(text: str, minimum: int = 1) -> list[float]:
    """"-1,-0.5,0,0.5,1" -> distinct finite slider values (at least `minimum`)."""
    try:
        alphas = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--alphas must be comma-separated numbers such as -1,-0.5,0,0.5,1, "
                                         f"got {text!r}") from None
    if len(alphas) < minimum or len(set(alphas)) != len(alphas) or not all(math.isfinite(a) for a in alphas):
        raise argparse.ArgumentTypeError(f"--alphas needs at least {minimum} distinct finite value(s), got {text!r}")
    return alphas


def join_alphas(argv: list[str]) -> list[str]:
    """`--alphas -1,-0.5,0` -> `--alphas=-1,-0.5,0`: argparse would take a value starting with '-' for a flag."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] == "--alphas" and not arg.startswith("--"):
            out[-1] = f"--alphas={arg}"
        else:
            out.append(arg)
    return out
