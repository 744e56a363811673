"""What every evaluator shares: loading a transformers model and its processor, batching, input checks."""
from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import torch
from PIL import Image

from ..hub import hub_problem, looks_like_repo_id


class EvaluatorLoadError(ValueError):
    """An evaluator's model could not be loaded from the given hub id or folder."""


class HubUnreachableError(EvaluatorLoadError):
    """A model named by hub id is not cached locally and the hub is offline or cannot be reached."""


class MissingExtraError(ImportError):
    """An optional package needed by one evaluator (lpips, insightface) is not installed."""


def import_extra(module: str, needed_for: str, install: str) -> ModuleType:
    """Import an optional package only when an evaluator that needs it is built."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"{needed_for} needs the optional package imported as '{module}', which failed ({err}). "
            f"Install it with `pip install {install}`, or leave this metric out.") from None


def check_hub_source(source: str | os.PathLike, what: str, filename: str = "config.json") -> None:
    """Fail at once, in one line, when `source` is a hub id that only an unreachable hub could provide
    (hub.hub_problem: no network access for a local path or a cached file, else at most one request)."""
    problem = hub_problem(source, what, filename)
    if problem is not None:
        raise HubUnreachableError(problem)


def load_model(model_class: type, processor_class: type, source: str | os.PathLike, model_types: tuple[str, ...],
               device: str | torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, object]:
    """Load `model_class` and its processor from a hub id or a local folder, in eval mode on `device`.

    The config's model_type is checked first: a specific class loaded from another architecture's
    folder would only warn and return nonsense scores.
    """
    from transformers import AutoConfig

    what = f"{model_class.__name__} ({' or '.join(model_types)})"
    text = str(source)
    if not Path(text).expanduser().exists() and not looks_like_repo_id(text):
        raise EvaluatorLoadError(f"the {what} model folder {text} does not exist")
    check_hub_source(text, what)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise EvaluatorLoadError(
            f"could not load the {what} model from {text!r}: {err}\n"
            "Pass a hub id (downloaded once, then cached) or a local folder with config.json, the weights "
            "and the processor files.") from None
    if config.model_type not in model_types:
        raise EvaluatorLoadError(
            f"{text!r} holds a {config.model_type!r} model, but this evaluator needs {what}")
    model = model_class.from_pretrained(source).to(device=device, dtype=dtype).eval()
    processor = processor_class.from_pretrained(source)
    return model, processor


def check_images(images: Sequence[Image.Image], name: str = "images") -> list[Image.Image]:
    """A non-empty list of PIL images, converted to RGB (PNG alpha and greyscale included)."""
    if isinstance(images, Image.Image) or not isinstance(images, Sequence) or len(images) == 0:
        raise TypeError(f"{name} must be a non-empty list of PIL images, got {type(images).__name__}")
    for index, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"{name}[{index}] must be a PIL image, got {type(image).__name__}")
    return [image.convert("RGB") for image in images]


def broadcast(items: object, count: int, name: str, item_type: type) -> list:
    """One item for every image: a single `item_type` is repeated, a list must have `count` of them."""
    if isinstance(items, item_type):
        return [items] * count
    if not isinstance(items, Sequence) or len(items) != count:
        length = len(items) if isinstance(items, Sequence) else type(items).__name__
        raise ValueError(f"{name} must be one {item_type.__name__} or a list of {count} (one per image), got {length}")
    for index, item in enumerate(items):
        if not isinstance(item, item_type):
            raise TypeError(f"{name}[{index}] must be of type {item_type.__name__}, got {type(item).__name__}")
    return list(items)


def batched(fn: Callable[..., torch.Tensor], batch_size: int, *lists: list) -> torch.Tensor:
    """Run `fn` on consecutive chunks of the (equally long) lists; concatenate its (chunk, ...) results.

    Results come back as float32 on the CPU, whatever the model's device and dtype.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    count = len(lists[0])
    with torch.inference_mode():
        parts = [fn(*(items[start:start + batch_size] for items in lists)).float().cpu()
                 for start in range(0, count, batch_size)]
    return torch.cat(parts)
