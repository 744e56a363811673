"""The toy recipe end to end at a few steps per stage: it writes a folder the pipeline loads, with its
model card and example, and a second run with the same work folder resumes instead of retraining."""
import json

import torch

from slideredit.pipelines import SliderEditFluxKontextPipeline
from slideredit.toy import recipe


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    assert recipe.lr_at(0, 100, 1.0, 10) == 0.1
    assert recipe.lr_at(9, 100, 1.0, 10) == 1.0
    assert recipe.lr_at(10, 100, 1.0, 10) == 1.0
    assert abs(recipe.lr_at(100, 100, 1.0, 10) - 0.1) < 1e-12


def test_autoencoder_batches_switch_to_whole_images_for_the_last_third():
    cfg = recipe.RecipeConfig(ae_steps=30, ae_batch=8, ae_crop=64)
    assert recipe.autoencoder_batch(cfg, 0).shape == (8, 3, 64, 64)
    assert recipe.autoencoder_batch(cfg, 20).shape == (2, 3, 128, 128)
    assert torch.equal(recipe.autoencoder_batch(cfg, 3), recipe.autoencoder_batch(cfg, 3))


def test_recipe_runs_resumes_and_writes_a_loadable_folder(tmp_path):
    args = ["--out", str(tmp_path / "model"), "--workdir", str(tmp_path / "work"), "--ae-steps", "3",
            "--pool-sources", "3", "--edits-per-source", "2", "--flux-steps", "3", "--flux-batch", "4",
            "--sample-every", "3", "--eval-examples", "1", "--eval-steps", "2", "--log-every", "1",
            "--slider-scenes", "4", "--slider-steps", "2"]
    metrics = recipe.main(args)
    assert metrics["edited"]["count"] == 3  # one one-edit and one two-edit prompt
    out = tmp_path / "model"
    card = (out / "README.md").read_text()
    assert "python -m slideredit.toy.recipe --out" in card and "--flux-steps 3" in card
    example = json.loads((out / "example.json").read_text())
    assert example["prompt"] == " and ".join(example["subprompts"]) and example["steps"] == 2
    pipe = SliderEditFluxKontextPipeline.from_pretrained(out, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(image=out / "example.png", prompt=example["prompt"], num_inference_steps=1).images[0]
    assert image.size == (128, 128)
    pipe.load_gstlora(out / "sliders" / "gstlora")  # the sliders were trained and shipped in the folder
    pipe.load_stlora(out / "sliders" / "stlora")

    # The batch of a step depends on the step only, so a resumed run trains on the same data.
    pool = torch.load(tmp_path / "work" / "pool.pt", weights_only=True)
    cfg = recipe.RecipeConfig(flux_batch=4)
    a, b = recipe.flux_batch(cfg, pool, 7), recipe.flux_batch(cfg, pool, 7)
    assert all(torch.equal(a[k], b[k]) for k in a)

    recipe.main(args)
    log = (tmp_path / "work" / "log.txt").read_text()
    assert "autoencoder: done earlier" in log and "transformer: done earlier" in log and "pool: loaded" in log
