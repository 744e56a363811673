"""The kernels import as `slideredit.kernels`; top-level `kernels` is Hugging Face's package.

transformers >= 5.25 requires Hugging Face's `kernels` and imports it while loading its model classes. The
repository's kernels/ folder has no __init__.py, so from the repository root (where scripts put the root
first on sys.path) an installed regular package named `kernels` wins over it, and ours load as
slideredit.kernels in every way the project is used: a bare checkout, an editable install, a wheel.

Each case runs in a fresh interpreter: what `kernels` resolves to depends on sys.path at first import."""
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_KERNELS_SPEC = importlib.util.find_spec("kernels")  # a namespace (origin None) is our own folder, seen from the root
HF_KERNELS = _KERNELS_SPEC is not None and _KERNELS_SPEC.origin is not None  # CI installs it with transformers

# Run from any folder: which files back both names, then a tiny T5 and CLIP from transformers (which import
# Hugging Face's kernels when it is installed), then one STLoRA-style masked slider call through our kernels.
PROBE = """
import importlib.util, torch
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
from slideredit.kernels.masked_lora import masked_lora_linear
import slideredit.kernels.masked_lora as ours
spec = importlib.util.find_spec("kernels")
print("ours", ours.__file__)
print("theirs", spec.origin if spec else None)
t5 = T5EncoderModel(T5Config(vocab_size=8, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2))
clip = CLIPTextModel(CLIPTextConfig(vocab_size=8, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, max_position_embeddings=8))
ids = torch.tensor([[1, 2, 3]])
assert t5(ids).last_hidden_state.shape == (1, 3, 8) and clip(ids).pooler_output.shape == (1, 8)
x, w = torch.randn(5, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
a, b = torch.randn(2, 4, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
scale = torch.tensor([[0.0], [1.0], [0.0], [-2.0], [1.0]], dtype=torch.float64)  # slider on tokens 1, 3, 4
y = masked_lora_linear(x, w, None, a, b, scale, backend="torch")
torch.testing.assert_close(y, x @ w.T + scale * (x @ a.T @ b.T))
print("ok")
"""


def _run(code: str, cwd: Path, pythonpath: str | None = None, python: str = sys.executable) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run([python, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) if " " in line else (line, "") for line in done.stdout.splitlines())
    assert "ok" in lines, done.stdout
    return lines


def _check_names(lines: dict[str, str], kernels_dir: Path) -> None:
    assert Path(lines["ours"]).resolve() == (kernels_dir / "masked_lora.py").resolve()
    if HF_KERNELS:  # `kernels` is Hugging Face's, never a folder of ours
        theirs = Path(lines["theirs"]).resolve()
        assert theirs.parent != (REPO / "kernels").resolve() and "site-packages" in theirs.parts, theirs
    else:
        assert lines["theirs"] in ("None", str(None)) or not lines["theirs"].endswith("masked_lora.py")


def test_hugging_faces_kernels_is_installed_where_transformers_requires_it():
    """The newest transformers (>= 5.25, what CI's main run installs) requires Hugging Face's kernels, so the
    cases below meet it there; the floor's run (.ci/run's second environment) has a transformers without it."""
    requires = importlib.metadata.requires("transformers") or []
    required = any(r.split(";")[0].replace(" ", "").startswith(("kernels>", "kernels=", "kernels<")) and "extra" not in r
                   for r in requires)
    if not required:
        pytest.skip(f"transformers {importlib.metadata.version('transformers')} does not require Hugging Face's kernels")
    assert HF_KERNELS, "transformers requires Hugging Face's `kernels`, but it is not importable"


def test_from_the_repository_root():
    """As `python infer.py` from a checkout: the root is first on sys.path."""
    _check_names(_run(PROBE, cwd=REPO, pythonpath=None), REPO / "kernels")


def test_from_another_folder(tmp_path):
    """A library call from another folder: an editable install (this environment's) or PYTHONPATH to a checkout."""
    _check_names(_run(PROBE, cwd=tmp_path, pythonpath=str(REPO)), REPO / "kernels")
    installed = subprocess.run([sys.executable, "-c", "import slideredit; print(slideredit.__file__)"], cwd=tmp_path,
                               env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, capture_output=True, text=True)
    if installed.returncode == 0 and Path(installed.stdout.strip()).parent == REPO / "slideredit":
        _check_names(_run(PROBE, cwd=tmp_path), REPO / "kernels")  # the editable install, no PYTHONPATH
        command = Path(sys.executable).parent / "slideredit-train"  # its console command runs train.py
        done = subprocess.run([command, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.startswith("usage: slideredit-train"), done.stderr[-2000:]


def test_wheel_installs_kernels_under_slideredit_only(tmp_path):
    """`pip install .`: the wheel holds slideredit/kernels/ and no top-level kernels/ (which would overwrite
    Hugging Face's folder in site-packages); installed into a folder of its own, it runs from elsewhere."""
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", wheels,
         REPO], cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("slideredit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "slideredit/kernels/masked_lora.py" in names and "slideredit/kernels/dispatch.py" in names
    assert not [n for n in names if n.startswith("kernels/")], names
    assert {"slideredit/toy/model_card.md", "slideredit/toy/model_card_sliders.md"} <= set(names)  # package-data

    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:  # what pip's install of a pure-Python wheel lays down
        archive.extractall(site)
    lines = _run(PROBE, cwd=tmp_path, pythonpath=str(site))
    _check_names(lines, site / "slideredit" / "kernels")

    # The console commands: entry points into the root scripts, installed as slideredit.scripts.
    (info,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    entry_points = zipfile.ZipFile(wheel).read(info).decode()
    for command in ("infer", "train", "eval"):
        assert f"slideredit-{command} = slideredit.scripts.{command}:cli" in entry_points
        assert f"slideredit/scripts/{command}.py" in names
        code = f"import sys; sys.argv = ['slideredit-{command}', '--help']; from slideredit.scripts.{command} import cli; cli()"
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0 and done.stdout.startswith(f"usage: slideredit-{command}"), done.stderr[-2000:]


def test_old_import_name_says_the_new_one():
    """`import kernels.masked_lora`, where it can still reach our file (the repository root on the path and
    no Hugging Face kernels: here `python -S` hides site-packages), fails with the new import spelled out
    instead of loading a second copy of the kernels."""
    done = subprocess.run([sys.executable, "-S", "-c", "import kernels.masked_lora"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "from slideredit.kernels.masked_lora import masked_lora_linear" in done.stderr.splitlines()[-1]


def test_requirements_and_pyproject_ask_for_the_same_runtime_packages():
    """`pip install -r requirements.txt` and `pip install .` give a user the same stack (triton included)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = (REPO / "requirements.txt").read_text().splitlines()
    listed = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    assert sorted(d.replace("'", '"') for d in declared) == sorted(listed)
    assert not any(d.startswith("transformers") and "<" in d for d in declared), "transformers is not capped"
