"""A Hugging Face hub that cannot be reached, faked in the test's process: no test touches the network.

The one-line hub check (slideredit/hub.py: hub_problem) makes its single request
with urllib; the fixture refuses every such request and records it, so a test counts the attempts.
Import the fixture into a test module with `from fake_hub import unreachable_hub  # noqa: F401`.
"""
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

ENDPOINT = "http://127.0.0.1:9"


@pytest.fixture()
def unreachable_hub(monkeypatch) -> Iterator[list[str]]:
    """HF_ENDPOINT points at ENDPOINT, offline mode is off, and every request is refused at once.
    Returns the URLs requested, one per connection attempt. The check's per-process cache of answers is
    emptied before and after, so no other test sees this hub's answer."""
    from slideredit import hub

    attempts = []

    def refuse(request: urllib.request.Request, timeout: float | None = None):
        attempts.append(request.full_url)
        raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))

    monkeypatch.setenv("HF_ENDPOINT", ENDPOINT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    hub._unreachable.cache_clear()
    yield attempts
    hub._unreachable.cache_clear()
