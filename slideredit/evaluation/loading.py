"""What every evaluator shares: loading a transformers model and its processor, batching, input checks."""
from __future__ import annotations

import functools
import importlib
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import torch
from PIL import Image


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


HUB_PROBE_TIMEOUT = 3.0  # seconds: one HEAD request decides whether the hub can be reached at all


def _offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as the hub client reads them, but read now, not at its import."""
    return any(os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.lru_cache(maxsize=None)
def _unreachable(url: str) -> str | None:
    """Why `url` cannot be reached (one attempt, no retries), or None when any HTTP answer comes back.

    Cached for the process: asking again costs nothing.
    """
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=HUB_PROBE_TIMEOUT).close()
    except urllib.error.HTTPError:  # 401, 404, 500...: the hub answered; the loader reports the rest
        return None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        return f"{type(reason).__name__}: {reason}" if not isinstance(reason, str) else reason
    return None


def check_hub_source(source: str | os.PathLike, what: str, filename: str = "config.json") -> None:
    """Fail at once, in one line, when `source` is a hub id that only an unreachable hub could provide.

    The hub client would otherwise retry a refused connection five times with back-off (about 30 s)
    before its error. A local path, or a hub id whose `filename` is already in the local cache (the
    client loads it offline), passes without any network access; otherwise HF_HUB_OFFLINE, or a single
    request to the endpoint that gets no HTTP answer, raises HubUnreachableError naming the model.
    """
    text = str(source)
    if Path(text).expanduser().exists():
        return
    from huggingface_hub import try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(text, filename), str):
            return
    except ValueError:  # not a valid repo id: the loader's own error says so
        return
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    if _offline():
        why = "offline mode (HF_HUB_OFFLINE is set)"
    else:
        reason = _unreachable(f"{endpoint}/{text}/resolve/main/{filename}")
        if reason is None:
            return
        why = f"{endpoint} is unreachable ({reason})"
    raise HubUnreachableError(f"cannot fetch the {what} model {text!r} from the Hugging Face hub: {why}, "
                              "and it is not in the local cache")


def load_model(model_class: type, processor_class: type, source: str | os.PathLike, model_types: tuple[str, ...],
               device: str | torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, object]:
    """Load `model_class` and its processor from a hub id or a local folder, in eval mode on `device`.

    The config's model_type is checked first: a specific class loaded from another architecture's
    folder would only warn and return nonsense scores.
    """
    from transformers import AutoConfig

    what = f"{model_class.__name__} ({' or '.join(model_types)})"
    text = str(source)
    if not Path(text).expanduser().exists() and (text.startswith((".", "/", "~")) or text.count("/") > 1):
        raise EvaluatorLoadError(f"the {what} model folder {text} does not exist")  # a path, not an owner/name hub id
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
