"""infer.py: one edit and slider sweeps on the tiny model folder."""
import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import infer
from slideredit.evaluation import read_sweep
from slideredit.grids import cell_scale
from slideredit.transformer import FluxParams
from fake_hub import unreachable_hub  # noqa: F401 (a fixture)
from interruptions import stop_pipeline_after
from test_sliders import release_checkpoint
from tiny_kontext import TRANSFORMER_CONFIG

TINY = FluxParams(vec_in_dim=TRANSFORMER_CONFIG["pooled_projection_dim"],
                  context_in_dim=TRANSFORMER_CONFIG["joint_attention_dim"],
                  hidden_size=TRANSFORMER_CONFIG["num_attention_heads"] * TRANSFORMER_CONFIG["attention_head_dim"],
                  num_heads=TRANSFORMER_CONFIG["num_attention_heads"], depth=TRANSFORMER_CONFIG["num_layers"],
                  depth_single_blocks=TRANSFORMER_CONFIG["num_single_layers"],
                  axes_dim=tuple(TRANSFORMER_CONFIG["axes_dims_rope"]))
COMMON = ["--keep-size", "--steps", "2", "--height", "32", "--width", "48", "--dtype", "float32", "--device", "cpu"]


@pytest.fixture()
def photo(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path)
    return path


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int64)


def test_single_edit_writes_a_png(tiny_kontext_dir, photo, tmp_path):
    out = infer.main(["--image", str(photo), "--prompt", "make the hair red", "--model", str(tiny_kontext_dir),
                      "--out", str(tmp_path / "edit.png"), *COMMON])
    assert Image.open(out).size == (48, 32)


def test_gstlora_sweep(tiny_kontext_dir, photo, tmp_path, monkeypatch):
    ckpt = tmp_path / "gst"
    ckpt.mkdir()
    save_file(release_checkpoint("gstlora", TINY), ckpt / "pytorch_lora_weights.safetensors")
    encodes = []
    from slideredit.text_encoders import KontextTextEncoders
    original = KontextTextEncoders.encode
    monkeypatch.setattr(KontextTextEncoders, "encode", lambda self, *a, **k: encodes.append(a) or original(self, *a, **k))

    out = infer.main(["--image", str(photo), "--prompt", "make the hair red", "--model", str(tiny_kontext_dir),
                      "--gstlora", str(ckpt), "--alphas", "-1,0,1", "--out", str(tmp_path / "sweep"), *COMMON])
    assert len(encodes) == 1  # the text encoders ran once for the whole sweep
    sweep = read_sweep(out)
    assert sweep.method == "gstlora" and [c.alphas for c in sweep.cells] == [(-1.0,), (0.0,), (1.0,)]
    grid, scale = Image.open(out / "grid.png"), cell_scale((48, 32))
    assert grid.width > 4 * 48 * scale and 32 * scale < grid.height < 2 * 32 * scale  # source + 3 cells, one row
    gif = Image.open(out / "sweep.gif")
    assert gif.n_frames == 4  # forward and back: -1, 0, 1, 0
    assert gif.width == 48 * scale  # enlarged as in the grid

    # alpha 0 is the plain edit with the same seed. With the adapter loaded the linear layers take other
    # GEMM routines (2-D vs 3-D inputs), whose float rounding differs by CPU: a few ULPs, at most one
    # 8-bit level after quantisation. Alpha -1 moves pixels by far more than that.
    plain = infer.main(["--image", str(photo), "--prompt", "make the hair red", "--model", str(tiny_kontext_dir),
                        "--out", str(tmp_path / "plain.png"), *COMMON])
    zero = pixels(out / sweep.cells[1].image)
    assert np.abs(pixels(plain) - zero).max() <= 1
    assert np.abs(pixels(out / sweep.cells[0].image) - zero).max() > 8


def test_stlora_grid_over_two_sliders(tiny_kontext_dir, photo, tmp_path):
    ckpt = tmp_path / "selective_lora.pt"
    torch.save(release_checkpoint("stlora", TINY), ckpt)
    out = infer.main(["--image", str(photo), "--model", str(tiny_kontext_dir), "--stlora", str(ckpt),
                      "--subprompts", "make the hair red", "add a hat", "--alphas", "0,1",
                      "--out", str(tmp_path / "st"), *COMMON])
    record = json.loads((out / "sweep.json").read_text())
    assert record["prompt"] == "make the hair red and add a hat"
    assert [c["alphas"] for c in record["cells"]] == [[0, 0], [0, 1], [1, 0], [1, 1]]
    grid, scale = Image.open(out / "grid.png"), cell_scale((48, 32))
    assert grid.height > 2 * 32 * scale and grid.width > 3 * 48 * scale  # 2 x 2 cells beside the source
    assert Image.open(out / "sweep.gif").n_frames == 6  # the serpentine 00 01 11 10, then back: 11 01
    images = [np.asarray(Image.open(out / c["image"])) for c in record["cells"]]
    assert not np.array_equal(images[0], images[3])


def test_gif_captions_have_the_same_height_on_every_frame():
    """A caption one line taller on the base edit's frame shifted that frame's picture down (seen in the demo)."""
    args = argparse.Namespace(gstlora=None, prompt="a and b", subprompts=["a", "b"])
    base, other = infer.frame_caption(args, (0.0, 0.0)), infer.frame_caption(args, (0.5, 0.0))
    assert base.splitlines() == ["+0.00 a", "+0.00 b", "base edit"]
    assert other.split("\n") == ["+0.50 a", "+0.00 b", ""]


def test_bad_arguments(photo, tmp_path, capsys):
    with pytest.raises(SystemExit):
        infer.main(["--image", str(photo), "--stlora", "x.pt"])
    assert "--subprompts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        infer.main(["--image", str(photo), "--prompt", "p", "--alphas", "a,b"])
    assert "--alphas must be comma-separated numbers" in capsys.readouterr().err


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        infer.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--keep-size", "--image", "--prompt", "--out", "--steps", "--guidance", "--seed", "--height", "--width", "--model",
                 "--gstlora", "--stlora", "--subprompts", "--alphas", "--snap-size", "--slider-alphas", "--sweep-slider",
                 "--device", "--dtype"):
        assert flag in text


# --- checks before anything loads ------------------------------------------------------------------------

FAST = ["--keep-size", "--steps", "1", "--height", "32", "--width", "48", "--dtype", "float32", "--device", "cpu"]
TOY = infer.TOY_MODEL


@pytest.fixture()
def no_loading(monkeypatch):
    """Loading the model fails the test: the error under test must come before it."""
    from slideredit.pipelines import SliderEditFluxKontextPipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(SliderEditFluxKontextPipeline, "from_pretrained", refuse)


@pytest.fixture()
def gst_ckpt(tmp_path):
    save_file(release_checkpoint("gstlora", TINY), tmp_path / "pytorch_lora_weights.safetensors")
    return tmp_path / "pytorch_lora_weights.safetensors"


@pytest.fixture()
def st_ckpt(tmp_path):
    torch.save(release_checkpoint("stlora", TINY), tmp_path / "selective_lora.pt")
    return tmp_path / "selective_lora.pt"


def usage_error(capsys, argv: list[str]) -> str:
    """The argparse error (exit status 2) that infer.main gives for argv."""
    with pytest.raises(SystemExit) as info:
        infer.main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--guidance", "nan"], "finite"), (["--guidance", "inf"], "finite"), (["--steps", "0"], ">= 1"),
    (["--alphas", "1,nan"], "finite"), (["--alphas", "1,,2"], "empty entry"), (["--alphas", "0,0"], "more than once"),
    (["--height", "8", "--width", "8"], "at least 16"), (["--image", "missing.png"], "no such file"),
])
def test_bad_values_are_rejected_before_loading(no_loading, capsys, photo, argv, message):
    argv = ["--prompt", "p", *(["--image", str(photo)] if "--image" not in argv else []), *argv]
    assert message in usage_error(capsys, argv)


def test_a_missing_model_folder_is_named_first(no_loading, capsys, photo, tmp_path):
    """Without --image it said '--image is required' (the default image comes from the model folder)."""
    missing = tmp_path / "no-such-model"
    for argv in ([], ["--image", str(photo)]):
        err = usage_error(capsys, ["--model", str(missing), "--prompt", "p", *argv])
        assert f"--model {missing}: model folder not found" in err and "--image is required" not in err
    assert "toy-kontext: model folder not found" in usage_error(capsys, ["--model", "toy-kontext", "--prompt", "p"])
    assert f"--model {photo}: is a file" in usage_error(capsys, ["--model", str(photo), "--image", str(photo)])
    with pytest.raises(AssertionError, match="model was loaded"):  # a hub id goes on to the pipeline
        infer.main(["--model", "black-forest-labs/FLUX.1-Kontext-dev", "--image", str(photo), "--prompt", "p"])


@pytest.mark.parametrize("argv, message", [
    (["--prompt", ""], "--prompt is empty: give the edit instruction"),
    (["--prompt", " \t"], "--prompt is blank: give the edit instruction"),
    (["--stlora", "s", "--subprompts", "add a hat", " "], "--subprompts: sub-prompt 2 of 2 is blank"),
    (["--stlora", "s", "--subprompts", "", "add a hat"], "--subprompts: sub-prompt 1 of 2 is empty"),
    (["--prompt", "add a hat and", "--stlora", "s", "--subprompts", "add a hat", ""], "sub-prompt 2 of 2 is empty"),
])
def test_empty_or_blank_instructions_are_refused(no_loading, capsys, photo, argv, message):
    assert message in usage_error(capsys, ["--image", str(photo), *argv])


def test_subprompts_without_stlora_is_an_error_not_the_demo(no_loading, capsys):
    """The toy model has an example, so this used to run the example sweep and ignore the sub-prompts."""
    assert "--subprompts needs --stlora" in usage_error(capsys, ["--subprompts", "make the circle blue"])
    assert "--subprompts needs --stlora" in usage_error(capsys, ["--prompt", "p", "--subprompts", "x"])


def test_huge_alphas_warn(no_loading, capsys, photo, gst_ckpt):
    with pytest.raises(AssertionError, match="model was loaded"):  # a warning, not an error
        infer.main(["--image", str(photo), "--prompt", "p", "--gstlora", str(gst_ckpt), "--alphas", "0", "1e6",
                    "--out", str(photo.parent / "sweep")])
    err = capsys.readouterr().err
    assert "warning: alpha 1e+06" in err and "alpha 0 " not in err


def test_huge_alphas_warn_once(tiny_kontext_dir, photo, tmp_path, st_ckpt, gst_ckpt, capsys, recwarn):
    """infer.py warned, then the pipeline once per sub-prompt: three warnings for one edit."""
    infer.main(["--image", str(photo), "--model", str(tiny_kontext_dir), "--stlora", str(st_ckpt), "--subprompts",
                "make the hair red", "add a hat", "--slider-alphas", "20", "20", "--out", str(tmp_path / "e.png"),
                *FAST])
    err = capsys.readouterr().err
    assert err.count("far outside") == 1 and "warning: alpha 20 is far outside" in err
    assert [str(w.message) for w in recwarn if "far outside" in str(w.message)] == []
    infer.main(["--image", str(photo), "--prompt", "p", "--model", str(tiny_kontext_dir), "--gstlora", str(gst_ckpt),
                "--alphas", "-20", "0", "20", "--batch-size", "2", "--out", str(tmp_path / "sweep"), *FAST])
    err = capsys.readouterr().err
    assert err.count("far outside") == 1 and "warning: alphas -20, 20 are far outside" in err
    assert [str(w.message) for w in recwarn if "far outside" in str(w.message)] == []


def test_bad_devices_fail_in_one_line_before_loading(no_loading, photo):
    bad = ["gpu", "cuda:x"]
    bad += [] if torch.cuda.is_available() else ["cuda", "cuda:0"]
    bad += [] if torch.backends.mps.is_available() else ["mps"]
    for device in bad:
        with pytest.raises(ValueError, match=f"--device '?{device}") as info:
            infer.main(["--image", str(photo), "--prompt", "p", "--device", device])
        assert "\n" not in str(info.value)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="use --device cpu"):
            infer.main(["--image", str(photo), "--prompt", "p", "--device", "cuda"])


def test_edit_output_is_checked_before_computing(no_loading, capsys, photo, tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("")
    cases = [(tmp_path / "folder", "is an existing folder"), (tmp_path / "afile" / "edit.png", "is a file, not a folder"),
             (tmp_path / "edit.bmp", "'.bmp'"), (tmp_path / "edit", "'(none)'")]
    for out, message in cases:
        err = usage_error(capsys, ["--image", str(photo), "--prompt", "p", "--out", str(out)])
        assert message in err and str(out) in err and ".tmp" not in err


def test_an_existing_edit_file_is_replaced_only_with_overwrite(no_loading, capsys, photo, tmp_path):
    out = tmp_path / "mine.png"
    out.write_bytes(b"the user's own picture")
    err = usage_error(capsys, ["--image", str(photo), "--prompt", "p", "--out", str(out)])
    assert f"--out {out}: exists; give another file name, or --overwrite to replace it" in err
    assert out.read_bytes() == b"the user's own picture"
    with pytest.raises(AssertionError, match="model was loaded"):  # accepted: the edit would replace it
        infer.main(["--image", str(photo), "--prompt", "p", "--out", str(out), "--overwrite"])


def test_sweep_output_is_checked_before_computing(no_loading, capsys, photo, tmp_path, gst_ckpt):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's own file")
    cases = [(photo, "is an existing file"), (tmp_path / "new.png", "looks like an image file"),
             (tmp_path / "mine", "holds 'notes.txt'")]
    for out, message in cases:
        err = usage_error(capsys, ["--image", str(photo), "--prompt", "p", "--gstlora", str(gst_ckpt), "--out", str(out)])
        assert message in err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "the user's own file"


@pytest.mark.parametrize("argv, message", [
    (["--slider-alphas", "1"], "--slider-alphas needs --gstlora or --stlora"),
    (["--gstlora", "g", "--slider-alphas", "1", "0"], "1 for a GSTLoRA"),
    (["--stlora", "s", "--subprompts", "a", "b", "--slider-alphas", "1"], "2 for 2 sub-prompt(s)"),
    (["--stlora", "s", "--subprompts", "a", "b", "c"], "5^3 = 125 cells: sweep one slider with --sweep-slider"),
    (["--stlora", "s", "--subprompts", "a", "b", "--sweep-slider", "3"], "only 2 sub-prompt(s)"),
    (["--gstlora", "g", "--sweep-slider", "1"], "--sweep-slider picks one STLoRA sub-prompt"),
])
def test_slider_flags_fit_together(no_loading, capsys, photo, argv, message):
    assert message in usage_error(capsys, ["--image", str(photo), "--prompt", "a and b and c", *argv])


# --- what the model folder decides ---------------------------------------------------------------------------

def test_the_model_folders_auto_resize_is_kept(tmp_path):
    """assets/toy-kontext says auto_resize: false: a 128x128 edit stays 128x128 (it used to be snapped to
    1024x1024, a washed-out image)."""
    out = infer.main(["--model", str(TOY), "--prompt", "make the circle blue", "--steps", "1", "--dtype", "float32",
                      "--device", "cpu", "--out", str(tmp_path / "edit.png")])
    assert Image.open(out).size == (128, 128)


def test_size_flags_reach_the_pipeline(tiny_kontext_dir, photo, tmp_path, monkeypatch):
    from slideredit.pipelines import KontextOutput, SliderEditFluxKontextPipeline

    seen = []  # what infer.py asks for; the toy test above shows the pipeline's default is then used
    monkeypatch.setattr(SliderEditFluxKontextPipeline, "__call__", lambda self, *a, **k: seen.append(
        k["auto_resize"]) or KontextOutput(images=[Image.new("RGB", (48, 32))]))
    for flag in ([], ["--keep-size"], ["--snap-size"]):
        infer.main(["--image", str(photo), "--prompt", "p", "--model", str(tiny_kontext_dir),
                    "--out", str(tmp_path / "e.png"), "--overwrite", *FAST[1:], *flag])
    assert seen == [None, False, True]  # None: the model folder's slideredit.json decides


def test_a_large_aspect_change_is_noticed():
    note = infer.resize_notice(5000, 100, auto_resize=True)
    assert "5000x100" in note and "1568x672" in note and "--keep-size" in note
    assert infer.resize_notice(1100, 1000, auto_resize=True) is None  # 1.10:1 -> 1104x944, 1.17:1: a 6% change
    assert infer.resize_notice(3000, 1000, auto_resize=True) is not None  # 3:1 -> 1568x672, 2.33:1: 22%
    assert infer.resize_notice(31, 17, auto_resize=False) is not None  # floored to 16x16
    assert infer.resize_notice(128, 128, auto_resize=False) is None


# --- sweeps: swapped in whole, one progress bar ------------------------------------------------------------------

def folder_bytes(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_interrupted_sweep_leaves_the_previous_one_intact(tiny_kontext_dir, photo, tmp_path, gst_ckpt, monkeypatch):
    argv = ["--image", str(photo), "--prompt", "make the hair red", "--model", str(tiny_kontext_dir),
            "--gstlora", str(gst_ckpt), "--alphas", "-1", "1", "--out", str(tmp_path / "sweep"), *FAST]
    out = infer.main([*argv, "--seed", "0"])
    before = folder_bytes(out)
    assert read_sweep(out).seed == 0 and len(before) == 2 + 5  # cells, source, grid, GIF, sweep.json, index.html

    with monkeypatch.context() as patch:
        stop_pipeline_after(patch, 1)  # after the first new cell is written
        with pytest.raises(KeyboardInterrupt):
            infer.main([*argv, "--seed", "2"])
    assert folder_bytes(out) == before
    # beside it, only the work folder with the cell made (no half-written file: atomic writes' .tmp/.old)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".sweep")) == [".sweep.partial"]
    assert sorted(folder_bytes(tmp_path / ".sweep.partial")) == ["cells/-1.00.png", "manifest.json"]

    calls = spy_calls(monkeypatch)
    infer.main([*argv, "--seed", "2"])
    assert [call["slider_alpha"] for call in calls] == [[1.0]]  # the cell the interrupted run did not make
    after = read_sweep(out)
    assert after.seed == 2 and len(folder_bytes(out)) == len(before) and folder_bytes(out) != before
    assert not (tmp_path / ".sweep.partial").exists()


def killed_sweep(monkeypatch, argv: list[str], calls: int) -> None:
    """A sweep stopped after `calls` pipeline calls: the next one raises, as a kill would stop it there."""
    with monkeypatch.context() as patch:
        stop_pipeline_after(patch, calls)
        with pytest.raises(KeyboardInterrupt):
            infer.main(argv)


def st_sweep(photo, model, st_ckpt, out, *extra: str) -> list[str]:
    """Both sliders over -1, 1: cells (-1, -1), (-1, 1), (1, -1), (1, 1)."""
    return ["--image", str(photo), "--model", str(model), "--stlora", str(st_ckpt), "--subprompts",
            "make the hair red", "add a hat", "--alphas", "-1", "1", "--out", str(out), *FAST, *extra]


def test_a_killed_sweep_makes_only_the_missing_cells(tiny_kontext_dir, photo, tmp_path, st_ckpt, monkeypatch):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    calls = spy_calls(monkeypatch)
    infer.main(st_sweep(photo, tiny_kontext_dir, st_ckpt, whole))
    assert len(calls) == 4
    killed_sweep(monkeypatch, st_sweep(photo, tiny_kontext_dir, st_ckpt, resumed), calls=2)
    assert not resumed.exists()  # --out appears only when the sweep is complete
    work = tmp_path / ".resumed.partial"
    assert sorted(json.loads((work / "manifest.json").read_text())["cells"]) == ["cells/-1.00_+1.00.png",
                                                                                  "cells/-1.00_-1.00.png"]

    calls.clear()
    infer.main(st_sweep(photo, tiny_kontext_dir, st_ckpt, resumed))
    assert [call["slider_alpha_list"] for call in calls] == [[[1.0], [-1.0]], [[1.0], [1.0]]]  # per slider
    assert folder_bytes(resumed) == folder_bytes(whole)  # the cells byte for byte, grid, GIF, sweep.json, page
    assert not work.exists()


def test_a_batch_cut_short_is_made_again_whole(tiny_kontext_dir, photo, tmp_path, st_ckpt, monkeypatch):
    """Cells of one pipeline call are made together: a kill between recording the two cells of the second
    batch makes that batch again, both cells in one call, as the uninterrupted run made them."""
    from slideredit.evaluation.sharding import CellManifest

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    infer.main(st_sweep(photo, tiny_kontext_dir, st_ckpt, whole, "--batch-size", "2"))
    recorded, record = [], CellManifest.record

    def cut(self, name, key):
        if len(recorded) == 3:
            raise KeyboardInterrupt
        recorded.append(name)
        record(self, name, key)
    with monkeypatch.context() as patch:
        patch.setattr(CellManifest, "record", cut)
        with pytest.raises(KeyboardInterrupt):
            infer.main(st_sweep(photo, tiny_kontext_dir, st_ckpt, resumed, "--batch-size", "2"))
    assert len(recorded) == 3  # the first batch and the first cell of the second

    calls = spy_calls(monkeypatch)
    infer.main(st_sweep(photo, tiny_kontext_dir, st_ckpt, resumed, "--batch-size", "2"))
    assert [call["slider_alpha_list"] for call in calls] == [[[1.0, 1.0], [-1.0, 1.0]]]
    assert folder_bytes(resumed) == folder_bytes(whole)


def test_a_changed_setting_or_a_lost_cell_is_made_again(tiny_kontext_dir, photo, tmp_path, st_ckpt, monkeypatch):
    out, work = tmp_path / "sweep", tmp_path / ".sweep.partial"
    killed_sweep(monkeypatch, st_sweep(photo, tiny_kontext_dir, st_ckpt, out), calls=2)
    calls = spy_calls(monkeypatch)
    infer.main(st_sweep(photo, tiny_kontext_dir, st_ckpt, out, "--seed", "1"))  # other noise: every cell again
    assert len(calls) == 4 and read_sweep(out).seed == 1

    killed_sweep(monkeypatch, st_sweep(photo, tiny_kontext_dir, st_ckpt, out), calls=2)
    (work / "cells" / "-1.00_-1.00.png").unlink()  # recorded, but gone
    calls.clear()
    infer.main(st_sweep(photo, tiny_kontext_dir, st_ckpt, out))
    assert len(calls) == 3 and calls[0]["slider_alpha_list"] == [[-1.0], [-1.0]]

    killed_sweep(monkeypatch, st_sweep(photo, tiny_kontext_dir, st_ckpt, out), calls=2)
    torch.save({k: 2 * v for k, v in torch.load(st_ckpt).items()}, st_ckpt)  # retrained at the same path
    calls.clear()
    infer.main(st_sweep(photo, tiny_kontext_dir, st_ckpt, out))
    assert len(calls) == 4


def test_a_cells_key_covers_every_setting_of_its_image(tiny_kontext_dir, photo, tmp_path, st_ckpt):
    base = ["--image", str(photo), "--model", str(tiny_kontext_dir), "--stlora", str(st_ckpt), "--subprompts", "a",
            "b", "--alphas", "-1", "1", "--out", str(tmp_path / "sweep"), *FAST]
    cell, chunks = (1.0, -1.0), [[(1.0, -1.0)]]

    def key(argv: list[str], auto_resize: bool = False, chunks: list = chunks) -> str:
        return infer.cell_keys(infer.parse_args(argv), auto_resize, chunks)[cell]

    same = key(base)
    assert key(list(base)) == same  # a rerun with the same arguments finds its cells
    changed = [["--seed", "1"], ["--steps", "2"], ["--guidance", "3"], ["--height", "48", "--width", "32"],
               ["--dtype", "bfloat16"], ["--device", "cuda"], ["--prompt", "p"], ["--slider-start", "0.5"],
               ["--offload"], ["--quantize", "fp8"], ["--t5-quantize", "fp8"], ["--compile"],
               ["--subprompts", "a", "c"], ["--model", str(TOY)]]
    keys = [key([*base, *extra]) for extra in changed]
    keys += [key(base, auto_resize=True), key(base, chunks=[[(1.0, -1.0), (1.0, 1.0)]])]  # snapped; in a batch
    photo.write_bytes(photo.read_bytes() + b"\0")  # another file, the same pixels
    keys.append(key(base))
    torch.save({k: 2 * v for k, v in torch.load(st_ckpt).items()}, st_ckpt)
    keys.append(key(base))
    assert len(set(keys)) == len(keys) and same not in keys


def test_one_progress_bar_over_the_cells(tiny_kontext_dir, photo, tmp_path, gst_ckpt, capsys):
    infer.main(["--image", str(photo), "--prompt", "p", "--model", str(tiny_kontext_dir), "--gstlora", str(gst_ckpt),
                "--alphas", "0,1", "--out", str(tmp_path / "sweep"), *FAST])
    err = capsys.readouterr().err
    assert "2/2" in err and "denoising" not in err  # the per-cell bars are silenced


def test_lazy_imports_parse_without_torch(tmp_path):
    """infer.py and the slideredit modules it parses with (the package's __init__ included: its exports
    load on first use) import no torch: --help and argument errors are instant."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(infer.__file__).resolve().parent
    code = ("import sys\n"
            "import infer\n"
            "for argv in (['--help'], ['--guidance', 'nan'], ['--subprompts', 'x']):\n"
            "    try:\n        infer.parse_args(argv)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False False"


# --- one edit with sliders, and one slider of many -----------------------------------------------------------------

def test_slider_alphas_make_one_stlora_edit_equal_to_its_sweep_cell(tiny_kontext_dir, photo, tmp_path, st_ckpt):
    base = ["--image", str(photo), "--model", str(tiny_kontext_dir), "--stlora", str(st_ckpt),
            "--subprompts", "make the hair red", "add a hat", *FAST, "--slider-alphas", "1", "-0.5"]
    one = infer.main([*base, "--out", str(tmp_path / "one.png")])
    assert Image.open(one).size == (48, 32)
    sweep = infer.main([*base, "--sweep-slider", "1", "--alphas", "-0.5", "1", "--out", str(tmp_path / "row")])
    cells = read_sweep(sweep).cells
    assert [c.alphas for c in cells] == [(-0.5, -0.5), (1.0, -0.5)]
    # the same kernels on the same shapes: the same pixels
    assert np.array_equal(pixels(one), pixels(sweep / cells[1].image))
    assert not np.array_equal(pixels(one), pixels(sweep / cells[0].image))


def test_slider_alphas_make_one_gstlora_edit(tiny_kontext_dir, photo, tmp_path, gst_ckpt):
    base = ["--image", str(photo), "--prompt", "p", "--model", str(tiny_kontext_dir), "--gstlora", str(gst_ckpt), *FAST]
    one = infer.main([*base, "--slider-alphas", "1", "--out", str(tmp_path / "one.jpg")])
    assert Image.open(one).format == "JPEG"  # it used to write PNG bytes whatever the extension
    sweep = infer.main([*base, "--alphas", "1", "--out", str(tmp_path / "grid")])
    lossless = infer.main([*base, "--slider-alphas", "1", "--out", str(tmp_path / "one.png")])
    assert np.array_equal(pixels(lossless), pixels(sweep / read_sweep(sweep).cells[0].image))


def test_sweep_one_slider_of_three(tiny_kontext_dir, photo, tmp_path, st_ckpt):
    subprompts = ["make the hair red", "add a hat", "add a smile"]
    out = infer.main(["--image", str(photo), "--model", str(tiny_kontext_dir), "--stlora", str(st_ckpt),
                      "--subprompts", *subprompts, "--sweep-slider", "2", "--slider-alphas", "0.5", "9", "-1",
                      "--alphas", "0", "1", "--out", str(tmp_path / "st3"), *FAST])
    sweep = read_sweep(out)
    assert sweep.subprompts == subprompts and sweep.prompt == " and ".join(subprompts)
    assert [c.alphas for c in sweep.cells] == [(0.5, 0.0, -1.0), (0.5, 1.0, -1.0)]  # slider 2 swept, others held
    grid, scale = Image.open(out / "grid.png"), cell_scale((48, 32))
    assert grid.width > 3 * 48 * scale and 32 * scale < grid.height < 2 * 32 * scale  # source + 2 cells, one row


def test_auto_dtype_is_float32_on_the_cpu():
    """bfloat16 is emulated on most CPUs (the toy demo: 75 s a cell instead of 4 s in float32)."""
    assert infer.resolve_dtype("auto", "cpu") == torch.float32
    assert infer.resolve_dtype("auto", "cuda:0") == torch.bfloat16
    assert infer.resolve_dtype("float16", "cpu") == torch.float16


# --- batches, schedules, low-memory mode, the explorer page -------------------------------------------------------

def spy_calls(monkeypatch) -> list[dict]:
    """The keyword arguments of every pipeline call, the calls themselves still running."""
    from slideredit.pipelines import SliderEditFluxKontextPipeline

    calls, original = [], SliderEditFluxKontextPipeline.__call__
    monkeypatch.setattr(SliderEditFluxKontextPipeline, "__call__",
                        lambda self, *a, **k: calls.append(k) or original(self, *a, **k))
    return calls


def test_a_batched_sweep_equals_the_cell_by_cell_sweep(tiny_kontext_dir, photo, tmp_path, st_ckpt, monkeypatch):
    base = ["--image", str(photo), "--model", str(tiny_kontext_dir), "--stlora", str(st_ckpt),
            "--subprompts", "make the hair red", "add a hat", "--alphas", "-1", "1", *FAST]
    calls = spy_calls(monkeypatch)
    single = read_sweep(infer.main([*base, "--out", str(tmp_path / "one")]))
    assert len(calls) == 4
    batched = infer.main([*base, "--batch-size", "3", "--out", str(tmp_path / "three")])
    assert len(calls) == 6  # 4 cells in batches of 3 and 1
    assert calls[4]["slider_alpha_list"] == [[-1.0, -1.0, 1.0], [-1.0, 1.0, -1.0]]  # per slider, per image
    cells = read_sweep(batched).cells
    assert [c.alphas for c in cells] == [c.alphas for c in single.cells]
    # batched GEMMs round differently from single ones (a few ULPs): at most one 8-bit level apart,
    # while the cells themselves differ by far more, so each image got its own alphas
    for a, b in zip(single.cells, cells):
        assert np.abs(pixels(tmp_path / "one" / a.image) - pixels(batched / b.image)).max() <= 1
    assert np.abs(pixels(batched / cells[0].image) - pixels(batched / cells[3].image)).max() > 4


def test_slider_start_reaches_the_pipeline(tiny_kontext_dir, photo, tmp_path, gst_ckpt, monkeypatch, capsys):
    calls = spy_calls(monkeypatch)
    base = ["--image", str(photo), "--prompt", "p", "--model", str(tiny_kontext_dir), "--gstlora", str(gst_ckpt), *FAST]
    late = infer.main([*base, "--slider-alphas", "1", "--slider-start", "0.5", "--out", str(tmp_path / "late.png")])
    assert calls[-1]["slider_steps"] == (0.5, 1.0) and calls[-1]["slider_alpha"] == [1.0]
    full = infer.main([*base, "--slider-alphas", "1", "--out", str(tmp_path / "full.png")])
    assert calls[-1]["slider_steps"] == (0.0, 1.0)
    assert np.abs(pixels(late) - pixels(full)).max() > 8  # half of the steps without the slider
    for bad in ("1", "-0.1", "nan"):
        assert "--slider-start" in usage_error(capsys, [*base, "--slider-start", bad])


def test_quantize_fp8_edits_with_fp8_block_linears(tiny_kontext_dir, photo, tmp_path, gst_ckpt, monkeypatch):
    from slideredit.pipelines import SliderEditFluxKontextPipeline
    from slideredit.quantization import Fp8Linear

    loaded = []
    original = SliderEditFluxKontextPipeline.from_pretrained.__func__
    monkeypatch.setattr(SliderEditFluxKontextPipeline, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loaded.append(original(cls, *a, **k)) or loaded[-1]))
    base = ["--image", str(photo), "--prompt", "p", "--model", str(tiny_kontext_dir), *FAST]
    fp8 = infer.main([*base, "--quantize", "fp8", "--out", str(tmp_path / "fp8.png")])
    assert any(isinstance(m, Fp8Linear) for m in loaded[-1].transformer.modules())
    assert loaded[-1].offload  # the text encoders stay on the CPU in this mode
    plain = infer.main([*base, "--out", str(tmp_path / "plain.png")])
    # e4m3 keeps 3 mantissa bits: the images differ, but not by much on average
    assert 0 < np.abs(pixels(fp8) - pixels(plain)).mean() < 16


def test_a_sweep_writes_its_explorer_page_and_can_be_redone(tiny_kontext_dir, photo, tmp_path, gst_ckpt):
    argv = ["--image", str(photo), "--prompt", "p", "--model", str(tiny_kontext_dir), "--gstlora", str(gst_ckpt),
            "--alphas", "0", "1", "--out", str(tmp_path / "sweep"), *FAST]
    out = infer.main(argv)
    page = (out / "index.html").read_text()
    assert "cells/+1.00.png" in page and "cells/+0.00.png" in page
    assert infer.main(argv) == out  # a folder holding a previous sweep and its page is replaced


def test_a_sweep_records_its_model_relative_to_itself(tiny_kontext_dir, photo, tmp_path, gst_ckpt):
    """sweep.json and index.html held the model's absolute path: a moved or shared sweep lost its model
    (eval.py then picked the wrong scorer), and the page, made to be shared, showed a local path."""
    out = infer.main(["--image", str(photo), "--prompt", "p", "--model", str(tiny_kontext_dir), "--gstlora",
                      str(gst_ckpt), "--alphas", "0", "1", "--out", str(tmp_path / "sweep"), *FAST])
    record, page = (out / "sweep.json").read_text(), (out / "index.html").read_text()
    relative = Path(os.path.relpath(tiny_kontext_dir.resolve(), out.resolve())).as_posix()
    assert json.loads(record)["model"] == relative and relative.startswith("../")
    assert str(tiny_kontext_dir.parent) not in record + page and str(tmp_path) not in record + page
    assert read_sweep(out).model == str(tiny_kontext_dir.resolve())  # resolved again on reading


def test_an_unreachable_hub_stops_at_once_in_one_line(unreachable_hub, photo, monkeypatch):
    """The hub client retried a refused connection for about 30 s; now one request decides."""
    import slideredit.pipelines as pipelines
    from slideredit import CheckpointError

    monkeypatch.setattr(pipelines, "download_from_hub", lambda *a, **k: pytest.fail("went on to download"))
    with pytest.raises(CheckpointError) as caught:
        infer.main(["--model", "nobody/not-cached-kontext", "--image", str(photo), "--prompt", "p", *FAST])
    assert unreachable_hub == ["http://127.0.0.1:9/nobody/not-cached-kontext/resolve/main/model_index.json"]
    message = str(caught.value)
    assert "\n" not in message and "'nobody/not-cached-kontext'" in message
    assert "http://127.0.0.1:9 is unreachable (ConnectionRefusedError" in message and "local model folder" in message


def test_t5_quantize_reaches_from_pretrained(photo, monkeypatch):
    from slideredit.pipelines import SliderEditFluxKontextPipeline

    seen = {}

    def capture(*args, **kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt  # stop before anything loads
    monkeypatch.setattr(SliderEditFluxKontextPipeline, "from_pretrained", capture)
    with pytest.raises(KeyboardInterrupt):
        infer.main(["--image", str(photo), "--prompt", "p", "--quantize", "fp8", "--t5-quantize", "fp8", *FAST])
    assert seen["quantize"] == "fp8" and seen["t5_quantize"] == "fp8" and seen["offload"] is None
