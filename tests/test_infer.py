"""infer.py: one edit and slider sweeps on the tiny model folder."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import infer
from slideredit.evaluation import read_sweep
from slideredit.transformer import FluxParams
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
    assert Image.open(out / "grid.png").width == 3 * 48
    gif = Image.open(out / "sweep.gif")
    assert gif.n_frames == 4  # forward and back: -1, 0, 1, 0

    # alpha 0 is the plain edit with the same seed
    plain = infer.main(["--image", str(photo), "--prompt", "make the hair red", "--model", str(tiny_kontext_dir),
                        "--out", str(tmp_path / "plain.png"), *COMMON])
    zero = out / sweep.cells[1].image
    assert np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(zero)))
    assert not np.array_equal(np.asarray(Image.open(out / sweep.cells[0].image)), np.asarray(Image.open(zero)))


def test_stlora_grid_over_two_sliders(tiny_kontext_dir, photo, tmp_path):
    ckpt = tmp_path / "selective_lora.pt"
    torch.save(release_checkpoint("stlora", TINY), ckpt)
    out = infer.main(["--image", str(photo), "--model", str(tiny_kontext_dir), "--stlora", str(ckpt),
                      "--subprompts", "make the hair red", "add a hat", "--alphas", "0,1",
                      "--out", str(tmp_path / "st"), *COMMON])
    record = json.loads((out / "sweep.json").read_text())
    assert record["prompt"] == "make the hair red and add a hat"
    assert [c["alphas"] for c in record["cells"]] == [[0, 0], [0, 1], [1, 0], [1, 1]]
    grid = Image.open(out / "grid.png")
    assert grid.height > 2 * 32 and grid.width > 2 * 48
    images = [np.asarray(Image.open(out / c["image"])) for c in record["cells"]]
    assert not np.array_equal(images[0], images[3])


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
                 "--gstlora", "--stlora", "--subprompts", "--alphas"):
        assert flag in text
