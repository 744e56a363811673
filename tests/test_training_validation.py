"""Validation grids: each cell is the pipeline's edit at that column's slider value, so the cells differ
with alpha, and alpha 0 is the base model's edit; each row's label is its whole prompt, none of it cut."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageOps

from slideredit.pipelines import SliderEditFluxKontextPipeline
from slideredit.sliders import GSTLORA, STLORA, adapter_parameters, init_adapter
from slideredit.training.validation import validation_grid
from test_train_script import short_model_dir  # noqa: F401 (fixture)
from test_training_losses import one_thread  # noqa: F401 (autouse fixture)

PROMPT = "make the hair curly and add a red hat"
SCALES = [-1.0, 0.0, 1.0]
SIDE = 32


def cells(grid: Image.Image, rows: int, cols: int) -> list[list[np.ndarray]]:
    """The SIDE x SIDE cells, found from the bottom-right corner (the labels sit left of and above them)."""
    pixels = np.asarray(grid).astype(np.int16)
    h, w = pixels.shape[:2]
    return [[pixels[h - (rows - i) * SIDE:h - (rows - i - 1) * SIDE, w - (cols - j) * SIDE:w - (cols - j - 1) * SIDE]
             for j in range(cols)] for i in range(rows)]


def edit(pipe, image, **sliders) -> np.ndarray:
    out = pipe(image=image, prompt=PROMPT, num_inference_steps=2, guidance_scale=3.5, height=SIDE, width=SIDE,
               auto_resize=False, generator=torch.Generator("cpu").manual_seed(7), **sliders).images[0]
    return np.asarray(out).astype(np.int16)


@pytest.mark.parametrize("method", [GSTLORA, STLORA])
def test_validation_cells_follow_alpha_and_alpha_zero_is_the_base_model(short_model_dir, method):
    pipe = SliderEditFluxKontextPipeline.from_pretrained(short_model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8))
    base = edit(pipe, image)  # before any adapter exists

    init_adapter(pipe.transformer, method, rank=4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # a trained-looking adapter: B != 0
        for name, p in adapter_parameters(pipe.transformer, method).items():
            if name.endswith("lora_B"):
                p.normal_(0, 1.0, generator=torch.Generator().manual_seed(len(name)))
    grid = validation_grid(pipe, method, image, [PROMPT], SCALES, steps=2, guidance=3.5, seed=7)
    assert grid.size[1] > SIDE and grid.size[0] > len(SCALES) * SIDE  # labels above and beside the cells
    row = cells(grid, 1, len(SCALES))[0]

    # Each column is the edit at its alpha: GSTLoRA on every token, STLoRA on the first instruction's
    # tokens (the grid's documented choice), the same seed everywhere.
    for alpha, cell in zip(SCALES, row):
        sliders = ({"slider_alpha": alpha} if method == GSTLORA else
                   {"subprompts_list": ["make the hair curly"], "slider_alpha_list": [alpha]})
        assert np.abs(cell - edit(pipe, image, **sliders)).max() <= 1, alpha  # 1: uint8 rounding of equal math
    assert np.abs(row[1] - base).max() <= 1  # alpha 0: the base model's edit
    for a, b in [(0, 1), (1, 2), (0, 2)]:  # ... and the slider visibly moves it
        assert np.abs(row[a] - row[b]).mean() > 2, (SCALES[a], SCALES[b])


def ink(image: Image.Image) -> np.ndarray:
    """The non-white pixels of `image`, cropped to their bounding box."""
    box = ImageOps.invert(image.convert("L")).getbbox()
    assert box is not None, "no ink at all"
    return np.asarray(image.convert("L").crop(box))


@pytest.mark.parametrize("prompts", [
    [PROMPT, "make the square darker and make the circle larger and make the circle blue"],  # long ones
    ["WWW"]])  # short, and wider than a guess from the number of characters
def test_row_labels_show_the_whole_prompt(short_model_dir, prompts):
    """Each row's label strip (left of its cells) holds the prompt exactly as the font draws it alone: not
    shortened, and not running under the first cell."""
    pipe = SliderEditFluxKontextPipeline.from_pretrained(short_model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    init_adapter(pipe.transformer, GSTLORA, rank=4, generator=torch.Generator().manual_seed(0))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8))
    scales = [0.0, 1.0]
    grid = validation_grid(pipe, GSTLORA, image, prompts, scales, steps=1, guidance=3.5, seed=7)

    left, top = grid.width - len(scales) * SIDE, grid.height - len(prompts) * SIDE  # where the cells start
    for i, prompt in enumerate(prompts):
        alone = Image.new("RGB", (2000, 100), "white")
        ImageDraw.Draw(alone).text((10, 10), prompt, fill="black")  # the default font, as the grid's labels
        label_strip = grid.crop((0, top + i * SIDE, left, top + (i + 1) * SIDE))
        np.testing.assert_array_equal(ink(label_strip), ink(alone), err_msg=prompt)
