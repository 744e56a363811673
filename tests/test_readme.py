"""The README is code a reader runs: its "Reading the code" names resolve, and its Python API snippets run
one after another, as a reader pastes them into one session (on the tiny official-layout model)."""
import importlib
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_release_notebook import checkpoints, model_dir  # noqa: F401 (fixtures)

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end]


def resolve(dotted: str) -> object:
    """The object a dotted name such as `slideredit.sliders.SliderLinear.forward` names: the longest
    importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_reading_the_code_names_resolve():
    names = re.findall(r"`(slideredit\.[\w.]+)`", section("Reading the code"))
    assert len(names) >= 20, names
    unresolved = []
    for name in names:
        try:
            resolve(name)
        except (ImportError, AttributeError):
            unresolved.append(name)
    assert not unresolved, f"README names that do not exist: {unresolved}"


def test_reading_the_code_comes_within_the_first_sections():
    assert [m for m in re.findall(r"^## (.+)$", README, re.M)][:2] == ["Quick start", "Reading the code"]


def test_python_api_snippets_run_in_order(model_dir, checkpoints, tmp_path, monkeypatch):  # noqa: F811
    """The first three Python blocks of "Python API" (an edit, the release's slider calls, the calls beyond
    them) run in sequence with only the model, files, device, dtype and step count swapped for tiny ones."""
    blocks = re.findall(r"```python\n(.*?)```", section("Python API"), re.S)[:3]
    assert "unload_sliders()" in blocks[1] and "slider_alpha=[-1, -0.5, 0, 0.5, 1]" in blocks[2]
    rng = np.random.default_rng(0)
    for name in ("photo.png", "face.png"):
        Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(tmp_path / name)
    swaps = {'"black-forest-labs/FLUX.1-Kontext-dev"': repr(str(model_dir)), 'device="cuda"': 'device="cpu"',
             "torch.bfloat16": "torch.float32", '"checkpoints/gstlora"': repr(str(checkpoints / "gstlora")),
             '"checkpoints/selective_lora.pt"': repr(str(checkpoints / "selective_lora.pt"))}
    code = "\n".join(blocks)
    for old, new in swaps.items():
        assert old in code, old
        code = code.replace(old, new)
    code = re.sub(r"num_inference_steps=\d+, ", "", code)
    code = re.sub(r"\bpipe\(", "pipe(num_inference_steps=2, ", code)  # 2 steps, not 28: speed only
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)
    images = namespace["images"]
    assert len(images) == 3 and all(image.size == (48, 32) for image in images)
    assert isinstance(namespace["image"], Image.Image) and namespace["image"].size == (48, 32)
