"""slideredit.hub: the one rule that tells a hub repo id from a local path, and the one-line check that a
hub id can be fetched (no network here: the fake_hub fixture refuses every request and counts them)."""
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fake_hub import unreachable_hub  # noqa: F401 (a fixture)
from slideredit.hub import hub_problem, looks_like_repo_id

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("source, is_repo_id", [
    ("black-forest-labs/FLUX.1-Kontext-dev", True),
    (Path("openai/clip-vit-base-patch32"), True),  # a PathLike is read as its text
    ("toy-kontext", False),  # no owner: a missing folder, not a hub lookup
    ("runs/gst/checkpoint-400", False),  # two slashes: a path
    ("./model", False), ("../model", False),  # written as relative paths
    ("/models", False), ("~/kontext", False),  # absolute, home
    ("model/", False), ("/model", False),  # an empty name or owner: a folder written with its slash
])
def test_repo_id_rule(tmp_path, monkeypatch, source, is_repo_id):
    monkeypatch.chdir(tmp_path)  # none of these exists here
    assert looks_like_repo_id(source) is is_repo_id


def test_an_existing_path_is_never_a_repo_id(tmp_path, monkeypatch):
    """owner/name spelled like a hub id, but a folder (or file) that exists: the local copy wins."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "someone" / "kontext").mkdir(parents=True)
    (tmp_path / "someone" / "weights.safetensors").write_bytes(b"")
    assert not looks_like_repo_id("someone/kontext") and not looks_like_repo_id("someone/weights.safetensors")
    assert looks_like_repo_id("someone/other")


def test_local_paths_and_cached_ids_need_no_network(tmp_path, monkeypatch, unreachable_hub):
    """A path (existing or not) or a hub id whose file is in the local cache: None, and no request at all."""
    import huggingface_hub.constants

    cache = tmp_path / "cache"
    snapshot = cache / "models--someone--kontext" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    (cache / "models--someone--kontext" / "refs").mkdir()
    (cache / "models--someone--kontext" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    assert hub_problem(tmp_path, "FLUX.1 Kontext") is None
    assert hub_problem(tmp_path / "missing" / "model", "FLUX.1 Kontext") is None  # its loader says it is missing
    assert hub_problem("someone/kontext", "FLUX.1 Kontext", filename="model_index.json") is None
    assert unreachable_hub == []
    # the same id without that file in the cache is asked for once
    assert "is unreachable" in hub_problem("someone/kontext", "FLUX.1 Kontext", filename="config.json")
    assert unreachable_hub == ["http://127.0.0.1:9/someone/kontext/resolve/main/config.json"]


@pytest.mark.parametrize("offline", [False, True])
def test_an_unreachable_hub_is_one_line_after_at_most_one_request(offline, unreachable_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    for _ in range(2):  # the answer is kept for the process: the second check asks nothing
        problem = hub_problem("nobody/not-cached", "CLIP", filename="config.json")
    assert unreachable_hub == ([] if offline else ["http://127.0.0.1:9/nobody/not-cached/resolve/main/config.json"])
    assert "\n" not in problem and problem.startswith("cannot fetch the CLIP model 'nobody/not-cached' from the "
                                                      "Hugging Face hub: ")
    assert problem.endswith("and it is not in the local cache")
    assert ("offline mode (HF_HUB_OFFLINE is set)" if offline else
            "http://127.0.0.1:9 is unreachable (ConnectionRefusedError: [Errno 111] Connection refused)") in problem


def test_any_http_answer_means_the_hub_is_reachable(unreachable_hub, monkeypatch):
    """A 404 or 401 is the hub answering: the loader reports the rest (a typo, a gated repository)."""
    def not_found(request: urllib.request.Request, timeout: float | None = None):
        unreachable_hub.append(request.full_url)
        raise urllib.error.HTTPError(request.full_url, 404, "Not Found", None, None)

    monkeypatch.setattr(urllib.request, "urlopen", not_found)
    assert hub_problem("nobody/typo", "FLUX.1 Kontext", filename="model_index.json") is None
    assert unreachable_hub == ["http://127.0.0.1:9/nobody/typo/resolve/main/model_index.json"]


def test_importing_the_rule_imports_neither_torch_nor_the_hub_client():
    """infer.py decides whether --model is a folder or a hub id before its slow imports."""
    code = ("import sys\nimport slideredit.hub as hub\nhub.looks_like_repo_id('a/b')\n"
            "print('torch' in sys.modules, 'huggingface_hub' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False False"
