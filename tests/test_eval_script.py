"""eval.py end to end on tiny local models: sweep folders (one slider and an STLoRA grid), model mode with a
stand-in pipeline, the outputs' rows and keys, and the errors for bad flags and missing pieces."""
from __future__ import annotations

import csv
import importlib.util
import inspect
import json
import math
import os
import socket
import socketserver
import struct
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import slideredit
from slideredit.evaluation import ClipScore, DinoDistance, MissingExtraError, continuity_score, monotonicity_score
from test_evaluation import build_tiny_models, make_sweep_folder

ROOT = Path(__file__).resolve().parents[1]
TOY_MODEL = ROOT / "assets" / "toy-kontext"
spec = importlib.util.spec_from_file_location("eval_script", ROOT / "eval.py")
eval_script = sys.modules["eval_script"] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
spec.loader.exec_module(eval_script)

METRICS = ["clip", "siglip", "blip", "dino"]
REAL_PIPELINE = slideredit.SliderEditFluxKontextPipeline  # before any test swaps in the stand-in


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"))


def model_flags(tiny: dict[str, Path], out: Path) -> list[str]:
    return ["--clip-model", str(tiny["clip"]), "--siglip-model", str(tiny["siglip"]), "--blip-model", str(tiny["blip"]),
            "--dino-model", str(tiny["dino"]), "--device", "cpu", "--batch-size", "2", "--out", str(out)]


def read_outputs(out: Path) -> tuple[list[dict], dict, Image.Image]:
    with open(out / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    return rows, json.loads((out / "summary.json").read_text()), Image.open(out / "curves.png")


def test_sweep_mode_one_slider(tiny, tmp_path):
    alphas = [1.0, -1.0, 0.5, 0.0, -0.5]  # cells need not be in order
    folder = tmp_path / "curly"
    sweep = make_sweep_folder(folder, [(a,) for a in alphas])
    argv = ["--sweep", str(folder), "--attribute", "curly hair", *model_flags(tiny, tmp_path / "out")]
    assert eval_script.main(argv) == 0
    rows, summary, curves = read_outputs(tmp_path / "out")

    assert list(rows[0]) == ["case", "attribute", "alpha", "alphas", "image", *METRICS]
    assert [float(row["alpha"]) for row in rows] == alphas
    assert {row["case"] for row in rows} == {"curly"} and {row["attribute"] for row in rows} == {"curly hair"}
    # The CSV holds what the evaluators give for these images, attribute and source.
    images = [Image.open(folder / cell.image) for cell in sweep.cells]
    clip = ClipScore(tiny["clip"])(images, "curly hair")
    dino = DinoDistance(tiny["dino"])(images, Image.open(folder / "source.png"))
    np.testing.assert_allclose([float(row["clip"]) for row in rows], clip, atol=1e-5)
    np.testing.assert_allclose([float(row["dino"]) for row in rows], dino, atol=1e-5)

    assert summary["inputs"]["metrics"] == METRICS and summary["inputs"]["attribute"] == ["curly hair"]
    (case,) = summary["cases"]
    assert case["case"] == "curly" and case["alphas"] == sorted(alphas) and case["slider"] == 1
    clip_by_alpha = [value for _, value in sorted(zip(alphas, clip.tolist()))]
    stats = case["metrics"]["clip"]
    assert set(stats) == {"continuity", "monotonicity", "min", "max", "range", "values"}
    assert stats["continuity"] == pytest.approx(continuity_score(clip_by_alpha))
    assert stats["monotonicity"] == pytest.approx(monotonicity_score(sorted(alphas), clip_by_alpha))
    assert stats["min"] == pytest.approx(min(clip_by_alpha), abs=1e-6)
    assert stats["range"] == pytest.approx(max(clip_by_alpha) - min(clip_by_alpha), abs=1e-6)
    assert set(case["metrics"]) == set(METRICS)
    assert curves.size[0] == 3 * 420 and curves.size[1] > 2 * 300  # four panels in two rows and a legend


def test_sweep_mode_stlora_grid(tiny, tmp_path):
    grid = [(a, b) for a in (-1.0, 0.0, 1.0) for b in (-1.0, 0.0, 1.0)]
    folder = tmp_path / "grid"
    make_sweep_folder(folder, grid, method="stlora", subprompts=["make the hair curly", "add a smile"])
    out = tmp_path / "out"
    eval_script.main(["--sweep", str(folder), "--metrics", "clip,dino", *model_flags(tiny, out)])
    rows, summary, _ = read_outputs(out)

    assert len(rows) == 2 * 9  # the whole grid for each sub-prompt's case
    assert [row["case"] for row in rows] == ["grid/1"] * 9 + ["grid/2"] * 9
    assert {row["attribute"] for row in rows[:9]} == {"make the hair curly"}  # default: the sub-prompts
    assert [row["alphas"] for row in rows[:3]] == ["-1 -1", "-1 0", "-1 1"]
    assert [float(row["alpha"]) for row in rows[0:3]] == [-1, -1, -1]  # case 1: the first slider's alpha
    assert [float(row["alpha"]) for row in rows[9:12]] == [-1, 0, 1]  # case 2: the second slider's
    first, second = summary["cases"]
    assert first["alphas"] == second["alphas"] == [-1, 0, 1]
    # Case 1's curve: the cells with the second slider at 0 (rows 1, 4, 7 of the grid).
    curve = [float(rows[i]["clip"]) for i in (1, 4, 7)]
    np.testing.assert_allclose(first["metrics"]["clip"]["values"], curve)
    curve = [float(rows[9 + i]["dino"]) for i in (3, 4, 5)]
    np.testing.assert_allclose(second["metrics"]["dino"]["values"], curve)

    with pytest.raises(ValueError, match="1 attribute phrase.*2 slider"):
        eval_script.main(["--sweep", str(folder), "--attribute", "curly hair", *model_flags(tiny, out)])


class FakePipeline:
    """Stands in for slideredit.SliderEditFluxKontextPipeline: records calls, brightens the image by alpha."""

    made: list[FakePipeline] = []

    @classmethod
    def from_pretrained(cls, model, torch_dtype, device):
        pipe = cls()
        pipe.model, pipe.dtype, pipe.device, pipe.calls, pipe.adapter = model, torch_dtype, device, [], None
        cls.made.append(pipe)
        return pipe

    def load_gstlora(self, path):
        self.adapter = ("gstlora", Path(path))

    def load_stlora(self, path):
        self.adapter = ("stlora", Path(path))

    def __call__(self, image, prompt, generator, num_inference_steps, guidance_scale, **sliders):
        self.calls.append(dict(image=image, prompt=prompt, generator=generator, num_inference_steps=num_inference_steps,
                               guidance_scale=guidance_scale, **sliders))
        alphas = sliders.get("slider_alpha_list") or [sliders["slider_alpha"]]
        shift = int(40 * sum(alphas))
        return types.SimpleNamespace(images=[image.point(lambda v: max(0, min(255, v + shift)))])


def write_cases(tmp_path: Path, cases: list[dict]) -> Path:
    rng = np.random.default_rng(0)
    (tmp_path / "faces").mkdir()
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "faces" / "1.png")
    path = tmp_path / "cases.jsonl"
    path.write_text("\n".join(json.dumps(case) for case in cases) + "\n\n")
    return path


def assert_real_pipeline_accepts(pipe: FakePipeline) -> None:
    """The calls eval.py made to the stand-in bind to the real pipeline's signatures."""
    real = REAL_PIPELINE
    inspect.signature(real.from_pretrained).bind(pipe.model, torch_dtype=pipe.dtype, device=pipe.device)
    inspect.signature(getattr(real, f"load_{pipe.adapter[0]}")).bind(None, pipe.adapter[1])
    for call in pipe.calls:
        inspect.signature(real.__call__).bind(None, **call)


def test_model_mode_with_a_stand_in_pipeline(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(slideredit, "SliderEditFluxKontextPipeline", FakePipeline, raising=False)
    FakePipeline.made.clear()
    adapter = tmp_path / "selective_lora.pt"
    adapter.write_bytes(b"")
    cases = write_cases(tmp_path, [
        {"image": "faces/1.png", "prompt": "make the hair curly and add a smile",
         "subprompts": ["make the hair curly", "add a smile"], "attribute": ["curly hair", "smile"]},
        {"image": "faces/1.png", "prompt": "add glasses", "attribute": "glasses"}])
    out = tmp_path / "out"
    model = tmp_path / "kontext"  # a local folder: a hub id would need the (offline) hub
    model.mkdir()
    eval_script.main(["--model", str(model), "--stlora", str(adapter), "--cases", str(cases), "--alphas=-1,0,1",
                      "--seed", "7", "--steps", "3", "--metrics", "clip,dino", *model_flags(tiny, out)])

    (pipe,) = FakePipeline.made
    assert (pipe.model, pipe.dtype, pipe.device) == (str(model), torch.float32, "cpu")
    assert pipe.adapter == ("stlora", adapter)
    assert_real_pipeline_accepts(pipe)
    first_case = [call["slider_alpha_list"] for call in pipe.calls[:5]]
    assert first_case == [[-1, 0], [0, 0], [1, 0], [0, -1], [0, 1]]  # each slider alone; the 0 cell once
    assert all(call["generator"].initial_seed() == 7 and call["num_inference_steps"] == 3 for call in pipe.calls)
    assert pipe.calls[0]["subprompts_list"] == ["make the hair curly", "add a smile"]
    assert pipe.calls[5]["subprompts_list"] == ["add glasses"]  # no sub-prompts: the whole prompt is one

    sweep = json.loads((out / "sweeps" / "case000" / "sweep.json").read_text())
    assert sweep["method"] == "stlora" and sweep["seed"] == 7 and len(sweep["cells"]) == 5
    rows, summary, _ = read_outputs(out)
    assert len(rows) == 2 * 5 + 3
    assert [(c["case"], c["attribute"], c["alphas"]) for c in summary["cases"]] == [
        ("case000/1", "curly hair", [-1, 0, 1]), ("case000/2", "smile", [-1, 0, 1]), ("case001", "glasses", [-1, 0, 1])]
    # The stand-in brightens with alpha: the DINO distance to the source is 0 at alpha 0 only.
    dino = summary["cases"][2]["metrics"]["dino"]["values"]
    assert dino[1] == pytest.approx(0, abs=1e-5) and min(dino[0], dino[2]) > 1e-4


def test_model_mode_gstlora_calls_and_errors(tiny, tmp_path, monkeypatch):
    adapter = tmp_path / "pytorch_lora_weights.safetensors"
    adapter.write_bytes(b"")
    cases = write_cases(tmp_path, [{"image": "faces/1.png", "prompt": "make the hair curly", "attribute": "curly hair"}])
    (tmp_path / "kontext").mkdir()
    flags = ["--model", str(tmp_path / "kontext"), "--gstlora", str(adapter), "--cases", str(cases), "--metrics", "dino",
             *model_flags(tiny, tmp_path / "out")]
    monkeypatch.delitem(slideredit._EXPORTS, "SliderEditFluxKontextPipeline")  # the package exports it lazily
    with pytest.raises(ImportError, match="SliderEditFluxKontextPipeline.*--sweep"):
        eval_script.main(flags)

    monkeypatch.setattr(slideredit, "SliderEditFluxKontextPipeline", FakePipeline, raising=False)
    FakePipeline.made.clear()
    eval_script.main(flags)
    (pipe,) = FakePipeline.made
    assert pipe.adapter == ("gstlora", adapter)
    assert_real_pipeline_accepts(pipe)
    assert [call["slider_alpha"] for call in pipe.calls] == [-1, -0.5, 0, 0.5, 1]
    assert "subprompts_list" not in pipe.calls[0]

    bad = tmp_path / "bad.jsonl"
    for line, message in [('{"image": "faces/1.png"}', "bad.jsonl:1: expected an object"),
                          ('{"image": "faces/2.png", "prompt": "p", "attribute": "a"}',
                           "bad.jsonl:1: image .* does not exist"),
                          ('{"image": "faces/1.png", "prompt": "p", "attribute": ["a", "b"]}', "list of 1 strings"),
                          ("{oops", "bad.jsonl:1: not valid JSON")]:
        bad.write_text(line)
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            eval_script.main(["--model", "m", "--gstlora", str(adapter), "--cases", str(bad)])
    with pytest.raises(FileNotFoundError, match="adapter weights"):
        eval_script.main(["--model", "m", "--gstlora", str(tmp_path / "none.safetensors"), "--cases", str(cases)])


def test_missing_optional_metric_stops_before_work(tiny, tmp_path, monkeypatch):
    folder = tmp_path / "s"
    make_sweep_folder(folder, [(-1.0,), (1.0,)])
    monkeypatch.setitem(sys.modules, "lpips", None)
    with pytest.raises(MissingExtraError, match="pip install lpips"):
        eval_script.main(["--sweep", str(folder), "--metrics", "clip,lpips", *model_flags(tiny, tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_flags(capsys):
    with pytest.raises(SystemExit):
        eval_script.parse_args(["--help"])
    help_text = capsys.readouterr().out
    for flag in ("--sweep", "--model", "--scorer", "--gstlora", "--stlora", "--cases", "--alphas", "--seed", "--steps", "--guidance",
                 "--dtype", "--attribute", "--metrics", "--clip-model", "--siglip-model", "--blip-model",
                 "--dino-model", "--lpips-net", "--device", "--batch-size", "--out"):
        assert flag in help_text
    args = eval_script.parse_args(["--sweep", "a", "b"])
    assert args.metrics is None and args.scorer == "auto" and args.sweep == [Path("a"), Path("b")]
    eval_script.choose_scorer(args, [("tiny/kontext", Path("a")), (str(TOY_MODEL), Path("b"))])
    assert args.scorer == "pretrained" and args.metrics == METRICS  # not every sweep is a toy sweep
    assert eval_script.parse_args(["--model", "m", "--stlora", "s", "--cases", "c", "--alphas=-1,2"]).alphas == [-1, 2]
    for argv, message in [(["--sweep", "a", "--gstlora", "g"], "belong to model mode"),
                          (["--model", "m", "--cases", "c"], "--gstlora PATH or --stlora PATH"),
                          (["--model", "m", "--gstlora", "g"], "needs --cases"),
                          (["--sweep", "a", "--metrics", "clip,fid"], "expected distinct names"),
                          (["--model", "m", "--gstlora", "g", "--cases", "c", "--alphas=1,1"], "more than once"),
                          (["--sweep", "a", "--model", "m"], "not allowed with"),
                          (["--sweep", "a", "--scorer", "toy", "--metrics", "clip"], "--scorer toy always reports")]:
        with pytest.raises(SystemExit):
            eval_script.parse_args(argv)
        assert message in capsys.readouterr().err


def test_nan_scores_become_null_in_the_summary(tmp_path):
    assert eval_script._json_safe({"a": [1.0, math.nan], "b": Path("x")}) == {"a": [1.0, None], "b": "x"}


# ---------------------------------------------------------------------------------------------------
# The offline toy scorer, and the hub's fast failure
# ---------------------------------------------------------------------------------------------------

from slideredit.evaluation import Sweep, SweepCell, write_sweep  # noqa: E402
from slideredit.toy import shapes  # noqa: E402
from test_evaluation import partial_edit, toy_source  # noqa: E402

RED, LARGER = shapes.Edit("square", "red"), shapes.Edit("circle", "larger")


def make_toy_sweep(folder: Path, model: str) -> tuple[list[tuple[float, float]], dict]:
    """A 3 x 3 STLoRA sweep of rendered toy scenes: at alphas (a, b) the square went 1 - a/2 of the way
    to red and the circle 1 - b/2 of the way to larger (alpha 1 half suppresses, -1 exaggerates).
    Returns the grid and the true strengths per cell."""
    scene = toy_source(0)
    (folder / "cells").mkdir(parents=True)
    shapes.render_image(scene).save(folder / "source.png")
    grid = [(a, b) for a in (-1.0, 0.0, 1.0) for b in (-1.0, 0.0, 1.0)]
    cells, truth = [], {}
    for index, (a, b) in enumerate(grid):
        red, larger = (1 - a / 2 if a >= 0 else 1.0), 1 - b / 2  # colour cannot go past its target: stays 1
        name = f"cells/{index}.png"
        shapes.render_image(partial_edit(partial_edit(scene, RED, red), LARGER, larger)).save(folder / name)
        cells.append(SweepCell((a, b), name))
        truth[(a, b)] = (red, larger)
    write_sweep(folder, Sweep("source.png", f"{RED.instruction} and {LARGER.instruction}",
                              [RED.instruction, LARGER.instruction], 0, "stlora", model, 12, 2.5, cells))
    return grid, truth


def test_toy_scorer_is_chosen_for_toy_sweeps_and_reads_the_strengths(tmp_path):
    folder = tmp_path / "toy"
    grid, truth = make_toy_sweep(folder, str(TOY_MODEL))
    out = tmp_path / "out"
    assert eval_script.main(["--sweep", str(folder), "--out", str(out)]) == 0  # no model flags: nothing to load
    rows, summary, curves = read_outputs(out)

    toy_metrics = ["toy", "toy_others", "toy_image_error", "toy_color_error", "toy_position_error", "toy_size_error"]
    assert list(rows[0]) == ["case", "attribute", "alpha", "alphas", "image", *toy_metrics]
    assert summary["inputs"]["scorer"] == "toy" and summary["inputs"]["metrics"] == toy_metrics
    first, second = rows[:9], rows[9:]
    np.testing.assert_allclose([float(r["toy"]) for r in first], [truth[c][0] for c in grid], atol=0.03)
    np.testing.assert_allclose([float(r["toy_others"]) for r in first], [truth[c][1] for c in grid], atol=0.03)
    np.testing.assert_allclose([float(r["toy"]) for r in second], [truth[c][1] for c in grid], atol=0.03)
    np.testing.assert_allclose([float(r["toy_others"]) for r in second], [truth[c][0] for c in grid], atol=0.03)
    # Along alpha -1, 0, 1 (the other slider at 0). Colour ties at -1 and 0 (the same square is drawn):
    # Spearman of ranks (1, 2, 3) and (2.5, 2.5, 1) is -1.5 / sqrt(2 * 1.5).
    for case, expected, spearman in zip(summary["cases"], ([1.0, 1.0, 0.5], [1.5, 1.0, 0.5]), (-1.5 / 3**0.5, -1)):
        stats = case["metrics"]["toy"]
        np.testing.assert_allclose(stats["values"], expected, atol=0.03)
        assert stats["continuity"] == pytest.approx(continuity_score(stats["values"]))
        assert stats["monotonicity"] == pytest.approx(spearman)
    assert curves.size[0] > 0
    # The sweep's explorer page shows each cell's scores: one text score per case, as in the CSV.
    html = (folder / "index.html").read_text()
    data = json.loads(html.split('id="sweep-data">')[1].split("</script>")[0].replace("<\\/", "</"))
    for index in (0, 4, 8):
        assert data["cells"][index]["scores"] == {
            "toy (make the square red)": float(first[index]["toy"]),
            "toy_others (make the square red)": float(first[index]["toy_others"]),
            "toy (make the circle larger)": float(second[index]["toy"]),
            "toy_others (make the circle larger)": float(second[index]["toy_others"]),
            **{name: float(first[index][name]) for name in toy_metrics[2:]}}  # of the image: shown once

    # Explicitly, for a sweep whose model folder is gone (e.g. copied from another machine).
    other = tmp_path / "moved"
    make_toy_sweep(other, "/no/such/toy-kontext")
    eval_script.main(["--sweep", str(other), "--scorer", "toy", "--out", str(tmp_path / "out2")])
    rows, summary, _ = read_outputs(tmp_path / "out2")
    np.testing.assert_allclose([float(r["toy"]) for r in rows[:9]], [truth[c][0] for c in grid], atol=0.03)

    with pytest.raises(ValueError, match="toy scorer cannot read this sweep.*not a toy edit"):
        eval_script.main(["--sweep", str(folder), "--attribute", "curly hair", "--attribute", "a smile",
                          "--out", str(tmp_path / "out3")])


def test_model_mode_checks_every_toy_case_before_generating_any(tmp_path, monkeypatch):
    """With the toy model the toy scorer is chosen; a case it cannot read (here the second) is refused before
    the first edit, not after every sweep was generated (which left them half written)."""
    monkeypatch.setattr(slideredit, "SliderEditFluxKontextPipeline", FakePipeline, raising=False)
    adapter = tmp_path / "pytorch_lora_weights.safetensors"
    adapter.write_bytes(b"")
    shapes.render_image(toy_source(0)).save(tmp_path / "scene.png")
    prompt = f"{RED.instruction} and {LARGER.instruction}"
    cases = tmp_path / "cases.jsonl"
    good = {"image": "scene.png", "prompt": prompt, "attribute": RED.instruction}
    flags = ["--model", str(TOY_MODEL), "--gstlora", str(adapter), "--cases", str(cases), "--alphas=-1,0,1",
             "--device", "cpu"]

    cases.write_text(json.dumps(good) + "\n")  # readable cases run through
    FakePipeline.made.clear()
    assert eval_script.main([*flags, "--out", str(tmp_path / "good")]) == 0
    assert len(FakePipeline.made[0].calls) == 3
    assert json.loads((tmp_path / "good" / "summary.json").read_text())["inputs"]["scorer"] == "toy"

    cases.write_text(json.dumps(good) + "\n" + json.dumps({**good, "attribute": "curly hair"}) + "\n")
    FakePipeline.made.clear()
    with pytest.raises(ValueError, match=r"cases.jsonl: case 1 \(scene.png\): the toy scorer cannot read it: "
                                         r"'curly hair' .*is not a toy edit"):
        eval_script.main([*flags, "--out", str(tmp_path / "bad")])
    assert FakePipeline.made == [] and not (tmp_path / "bad").exists()


@pytest.fixture()
def read_only(monkeypatch):
    """Makes folders read-only. Root may write anywhere, and os.access says so: for root, os.access answers
    as the folder's mode would for a user."""
    folders = []
    real_access = os.access

    def access(path, mode, **kwargs):
        if mode & os.W_OK and Path(path).absolute() in folders:
            return False
        return real_access(path, mode, **kwargs)

    if os.geteuid() == 0:
        monkeypatch.setattr(os, "access", access)

    def make(folder: Path) -> Path:
        folder.mkdir(exist_ok=True)
        folder.chmod(0o555)
        folders.append(folder.absolute())
        return folder

    yield make
    for folder in folders:
        folder.chmod(0o755)


def test_an_out_that_cannot_be_written_stops_before_scoring(tmp_path, monkeypatch, capsys, read_only):
    folder = tmp_path / "toy"
    make_toy_sweep(folder, str(TOY_MODEL))

    def must_not_score(*args, **kwargs):
        raise AssertionError("eval.py scored although --out cannot be written")

    monkeypatch.setattr(eval_script, "evaluate_sweep", must_not_score)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    locked = read_only(tmp_path / "locked")
    for out, problem in [(a_file, f"{a_file} is a file, not a folder"),
                         (a_file / "eval", f"{a_file} is a file, not a folder"),
                         (locked, f"cannot write into {locked} (permission denied)"),
                         (locked / "eval", f"cannot write into {locked} (permission denied)")]:
        with pytest.raises(SystemExit) as exit_:
            eval_script.main(["--sweep", str(folder), "--out", str(out)])
        assert exit_.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f": error: --out {out}: {problem}")
    assert a_file.read_text() == "mine" and list(locked.iterdir()) == []


def test_a_read_only_sweep_folder_is_scored_without_its_explorer_page(tmp_path, capsys, read_only):
    folder = tmp_path / "shared"
    make_toy_sweep(folder, str(TOY_MODEL))
    read_only(folder)
    assert eval_script.main(["--sweep", str(folder), "--out", str(tmp_path / "out")]) == 0
    rows, _, _ = read_outputs(tmp_path / "out")
    assert len(rows) == 2 * 9
    assert not (folder / "index.html").exists()
    assert f"{folder / 'index.html'} is not updated: cannot write into {folder}" in capsys.readouterr().err


class RefusingHub(socketserver.TCPServer):
    """A stand-in for the hub on this machine (no network): it resets every connection at once and counts them."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), socketserver.BaseRequestHandler)
        self.url, self.attempts = f"http://127.0.0.1:{self.server_address[1]}", 0

    def process_request(self, request: socket.socket, client_address: object) -> None:
        self.attempts += 1
        request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
        request.close()


@pytest.fixture()
def refusing_hub():
    hub = RefusingHub()
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    yield hub
    hub.shutdown()
    hub.server_close()


def test_unreachable_hub_stops_eval_at_once_with_one_line(tmp_path, refusing_hub):
    """A hub that resets every connection, offline mode off, in a fresh process (whose hub client reads
    HF_HUB_OFFLINE at import): one attempt and one line. The hub client alone tried 4 times, for ~30 s."""
    import subprocess

    folder = tmp_path / "s"
    make_sweep_folder(folder, [(-1.0,), (1.0,)])
    env = {**os.environ, "HF_ENDPOINT": refusing_hub.url, "HF_HUB_OFFLINE": "0"}
    result = subprocess.run([sys.executable, "eval.py", "--sweep", str(folder), "--device", "cpu",
                             "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300,
                            cwd=ROOT)
    assert result.returncode == 2, result.stderr[-2000:]
    assert refusing_hub.attempts == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("eval.py: error: cannot fetch the CLIPModel (clip) model 'openai/clip-vit-base-patch32'")
    assert f"{refusing_hub.url} is unreachable" in line and "--clip-model" in line and "--scorer toy" in line
    assert not (tmp_path / "out").exists()
