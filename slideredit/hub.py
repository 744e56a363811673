"""Hugging Face hub ids: telling one from a local path, and failing at once when only an unreachable hub
could provide it.

No torch here, and the hub client is imported only when a hub id is checked: infer.py asks whether
--model is a folder or a hub id before its slow imports, so that argument errors answer at once.
"""
from __future__ import annotations

import functools
import os
import urllib.error
import urllib.request
from pathlib import Path

HUB_PROBE_TIMEOUT = 3.0  # seconds: one HEAD request decides whether the hub can be reached at all


def looks_like_repo_id(source: str | os.PathLike) -> bool:
    """`owner/name` that is not an existing path: a Hugging Face hub repository id.

    Exactly one slash between a non-empty owner and name, and not written as a path (./, ../, /, ~): a
    missing folder such as runs/gst/checkpoint-400, ./model or model/ is then reported as missing, not
    looked up on the hub."""
    text = str(source)
    owner, _, name = text.partition("/")
    return (not Path(text).exists() and text.count("/") == 1 and bool(owner) and bool(name)
            and not text.startswith((".", "~")))


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


def hub_problem(source: str | os.PathLike, what: str, filename: str = "config.json") -> str | None:
    """Why the `what` model `source` cannot be fetched, in one line: a hub id that only an unreachable hub
    could provide. None when it can be had (or its loader reports the problem itself).

    The hub client would otherwise retry a refused connection five times with back-off (about 30 s)
    before its error. Anything but a hub id (looks_like_repo_id), or a hub id whose `filename` is already
    in the local cache (the client loads it offline), is None without any network access; otherwise
    HF_HUB_OFFLINE, or a single request to the endpoint that gets no HTTP answer, is the problem. The
    callers raise it as their own error (CheckpointError, evaluation's HubUnreachableError).
    """
    text = str(source)
    if not looks_like_repo_id(text):
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(text, filename), str):
            return None
    except ValueError:  # not a valid repo id: the loader's own error says so
        return None
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    if _offline():
        why = "offline mode (HF_HUB_OFFLINE is set)"
    else:
        reason = _unreachable(f"{endpoint}/{text}/resolve/main/{filename}")
        if reason is None:
            return None
        why = f"{endpoint} is unreachable ({reason})"
    return f"cannot fetch the {what} model {text!r} from the Hugging Face hub: {why}, and it is not in the local cache"
