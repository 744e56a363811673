"""The SliderEdit release's sample-inference calls, verbatim, on the tiny official-layout model folder:
a GSTLoRA sweep, then an STLoRA loaded as `pipe.load_stlora(path, lora_rank=16, lora_dropout=0.0)` and
swept with the tuples `itertools.product` yields, on an image opened without `.convert`.

Only the model is tiny (its folder asks for the context image's own size, so nothing is upscaled to a
megapixel) and the step count is cut, for speed."""
import itertools
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from slideredit.pipelines import SliderEditFluxKontextPipeline
from test_infer import TINY
from test_sliders import release_checkpoint

SEED = 0
STEPS = 2


@pytest.fixture(scope="module")
def model_dir(tiny_kontext_dir, tmp_path_factory):
    """The tiny folder plus a slideredit.json that keeps the context image's size."""
    folder = tmp_path_factory.mktemp("notebook_model")
    for entry in tiny_kontext_dir.iterdir():
        os.symlink(entry, folder / entry.name)
    (folder / "slideredit.json").write_text(json.dumps({"auto_resize": False}))
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("release_ckpts")
    (root / "gstlora").mkdir()
    save_file(release_checkpoint("gstlora", TINY, rank=16, seed=4), root / "gstlora" / "pytorch_lora_weights.safetensors")
    torch.save(release_checkpoint("stlora", TINY, rank=16, seed=5), root / "selective_lora.pt")
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """An RGBA PNG and a palette (P-mode) PNG, as files a user would open."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (32, 48, 4), dtype=np.uint8)
    rgba[..., 3] = 255  # opaque: compositing on white changes nothing, so it must equal the RGB image
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    Image.fromarray(rgba[..., :3], "RGB").quantize(16).save(root / "palette.png")
    return root


def test_release_notebook_calls(model_dir, checkpoints, photos):
    pipe = SliderEditFluxKontextPipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = Image.open(photos / "rgba.png")
    assert image.mode == "RGBA"

    # GSTLoRA sweep
    pipe.load_gstlora(str(checkpoints / "gstlora"))
    gst_cells = []
    for alpha in [-1.0, 1.0]:
        output_image = pipe(
            image=image,
            prompt="make the hair red",
            generator=torch.Generator().manual_seed(SEED),
            slider_alpha=alpha,
            num_inference_steps=STEPS,
        ).images[0]
        gst_cells.append(np.asarray(output_image))
    assert all(cell.shape == (32, 48, 3) for cell in gst_cells)
    assert not np.array_equal(gst_cells[0], gst_cells[1])

    # The same sweep from the RGB pixels: the unconverted RGBA file gives the same edit.
    rgb = Image.open(photos / "rgba.png").convert("RGB")
    again = pipe(image=rgb, prompt="make the hair red", generator=torch.Generator().manual_seed(SEED),
                 slider_alpha=1.0, num_inference_steps=STEPS).images[0]
    assert np.array_equal(np.asarray(again), gst_cells[1])

    # STLoRA, loaded with the release's arguments, swept over the product of two sliders' alphas
    pipe.load_stlora(str(checkpoints / "selective_lora.pt"), lora_rank=16, lora_dropout=0.0)
    palette = Image.open(photos / "palette.png")
    assert palette.mode == "P"
    st_cells = {}
    for alphas in itertools.product([-1.0, 1.0], repeat=2):
        assert isinstance(alphas, tuple)
        st_cells[alphas] = np.asarray(pipe(
            image=palette,
            prompt="make the hair red and add a hat",
            generator=torch.Generator().manual_seed(SEED),
            subprompts_list=["make the hair red", "add a hat"],
            slider_alpha_list=alphas,
            num_inference_steps=STEPS,
        ).images[0])
    assert len({cell.tobytes() for cell in st_cells.values()}) == 4  # every cell differs

    # A tuple of alphas means exactly what the list means.
    as_list = pipe(image=palette, prompt="make the hair red and add a hat", generator=torch.Generator().manual_seed(SEED),
                   subprompts_list=["make the hair red", "add a hat"], slider_alpha_list=[-1.0, 1.0],
                   num_inference_steps=STEPS).images[0]
    assert np.array_equal(np.asarray(as_list), st_cells[(-1.0, 1.0)])
