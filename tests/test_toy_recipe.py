"""The toy recipe end to end at a few steps per stage: it writes a folder the pipeline loads, with its
model card and example, and a second run with the same work folder resumes instead of retraining. The
slider data command writes what the shipped slider configs read, and train.py runs them as shipped."""
import json
from pathlib import Path

import pytest
import torch
import yaml

import train as train_script
from slideredit.pipelines import SliderEditFluxKontextPipeline
from slideredit.toy import autoencoder_training, recipe, slider_data, slider_recipe
from slideredit.toy.autoencoder_training import autoencoder_batch, train_autoencoder
from slideredit.toy.model_card import write_model_card
from slideredit.toy.recipe_common import RecipeConfig, lr_at, recipe_command
from slideredit.toy.transformer_training import EDITED_TOKEN_MSE, flux_batch, token_weights
from slideredit.training import load_config

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "assets" / "toy-kontext" / "sliders"


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    assert lr_at(0, 100, 1.0, 10) == 0.1
    assert lr_at(9, 100, 1.0, 10) == 1.0
    assert lr_at(10, 100, 1.0, 10) == 1.0
    assert abs(lr_at(100, 100, 1.0, 10) - 0.1) < 1e-12


def test_token_weights_count_edited_tokens_more_by_hand():
    """Per-token mean square change of the latent: 0 -> weight 1, at or over EDITED_TOKEN_MSE -> the edit
    weight, linear between."""
    cond = torch.zeros(1, 4, 2)
    x0 = cond.clone()
    x0[0, 1] = (EDITED_TOKEN_MSE / 2) ** 0.5  # half the threshold
    x0[0, 2] = 1.0  # far over it
    t = torch.tensor([0.5])
    weights = token_weights(x0, cond, t, edit_weight=4.0)
    assert torch.allclose(weights, torch.tensor([[1.0, 2.5, 4.0, 1.0]]))
    assert torch.equal(token_weights(x0, cond, t, edit_weight=1.0), torch.ones(1, 4))
    # The identity term: copy_weight * t^2 on the unchanged part of each token (t^2 = 0.25 here), none on
    # a fully edited token.
    weights = token_weights(x0, cond, t, edit_weight=4.0, copy_weight=2.0)
    assert torch.allclose(weights, torch.tensor([[1.5, 2.75, 4.0, 1.5]]))


def test_autoencoder_batches_switch_to_whole_images_for_the_last_third():
    cfg = RecipeConfig(ae_steps=30, ae_batch=8, ae_crop=64)
    assert autoencoder_batch(cfg, 0).shape == (8, 3, 64, 64)
    assert autoencoder_batch(cfg, 20).shape == (2, 3, 128, 128)
    assert torch.equal(autoencoder_batch(cfg, 3), autoencoder_batch(cfg, 3))


def test_autoencoder_batches_of_the_decoder_phase_are_whole_images_of_the_same_stream():
    cfg = RecipeConfig(ae_steps=30, ae_batch=8, ae_crop=64)
    assert autoencoder_batch(cfg, 5, whole_images=3).shape == (3, 3, 128, 128)
    # whole images of a late step are the first phase's own whole images of that step, and more of them
    assert torch.equal(autoencoder_batch(cfg, 25, whole_images=3)[:2], autoencoder_batch(cfg, 25))


def test_the_decoder_phase_trains_the_decoder_and_leaves_the_encoder_bit_for_bit(tmp_path):
    """The second phase must not move a single latent (a transformer trained on the first phase's latents
    stays valid), it must change the decoder, and a work folder holding only the first phase's result
    resumes with the decoder phase."""
    cfg = RecipeConfig(workdir=tmp_path, ae_steps=2, ae_batch=2, ae_crop=32, ae_decoder_steps=2,
                       ae_decoder_batch=1, log_every=1)
    ae = train_autoencoder(cfg)
    first = torch.load(tmp_path / "ae.pt", weights_only=True)["model"]
    final = torch.load(tmp_path / "ae_decoder.pt", weights_only=True)["model"]
    assert all(torch.equal(final[k], ae.state_dict()[k]) for k in final)
    encoder = [k for k in first if k.startswith("encoder.")]
    decoder = [k for k in first if k.startswith("decoder.")]
    assert encoder and decoder and len(encoder) + len(decoder) == len(first)
    assert all(torch.equal(first[k], final[k]) for k in encoder)
    assert not all(torch.equal(first[k], final[k]) for k in decoder)
    report = json.loads((tmp_path / "autoencoder.json").read_text())
    assert {"image_error", "color_error_mean", "color_error_max"} <= report.keys()

    (tmp_path / "ae_decoder.pt").unlink()  # as if stopped after the first phase: only the decoder retrains
    again = train_autoencoder(cfg)
    assert all(torch.equal(again.state_dict()[k], final[k]) for k in final)  # same data and noise streams
    assert "autoencoder: done earlier, loaded; its decoder is refined next" in (tmp_path / "log.txt").read_text()


def test_a_decoder_phase_stopped_mid_way_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """Killed right after its first checkpoint, the decoder phase resumes from it (weights, optimizer, step,
    streams) and ends where an uninterrupted run ends."""
    def cfg(folder):
        return RecipeConfig(workdir=folder, ae_steps=2, ae_batch=2, ae_crop=32, ae_decoder_steps=4,
                            ae_decoder_batch=1, checkpoint_every=2, log_every=1)

    (tmp_path / "whole").mkdir()
    whole = train_autoencoder(cfg(tmp_path / "whole")).state_dict()

    (tmp_path / "stopped").mkdir()
    save = autoencoder_training.save_checkpoint

    def save_then_stop(path, state):
        save(path, state)
        if path.name == "ae_decoder.ckpt":
            raise KeyboardInterrupt

    monkeypatch.setattr(autoencoder_training, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train_autoencoder(cfg(tmp_path / "stopped"))
    monkeypatch.setattr(autoencoder_training, "save_checkpoint", save)
    resumed = train_autoencoder(cfg(tmp_path / "stopped")).state_dict()
    assert "decoder: resuming at step 2" in (tmp_path / "stopped" / "log.txt").read_text()
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    assert not (tmp_path / "stopped" / "ae_decoder.ckpt").exists()  # done: only ae_decoder.pt is left


def test_recipe_runs_resumes_and_writes_a_loadable_folder(tmp_path):
    args = ["--out", str(tmp_path / "model"), "--workdir", str(tmp_path / "work"), "--ae-steps", "3",
            "--ae-decoder-steps", "2", "--ae-decoder-batch", "1",
            "--pool-sources", "3", "--edits-per-source", "2", "--flux-steps", "3", "--flux-batch", "4",
            "--sample-every", "3", "--eval-examples", "1", "--eval-steps", "2", "--log-every", "1",
            "--slider-scenes", "4", "--slider-steps", "2"]
    metrics = recipe.main(args)
    assert metrics["edited"]["count"] == 3  # one one-edit and one two-edit prompt
    out = tmp_path / "model"
    card = (out / "README.md").read_text()
    assert "python -m slideredit.toy.recipe --out" in card and "--flux-steps 3" in card
    assert "4. Sliders" in card and "2 steps" in card  # the card is rewritten once the sliders are trained
    assert "brightness, in two-edit prompts" in card
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
    cfg = RecipeConfig(flux_batch=4)
    a, b = flux_batch(cfg, pool, 7), flux_batch(cfg, pool, 7)
    assert all(torch.equal(a[k], b[k]) for k in a)

    recipe.main(args)
    log = (tmp_path / "work" / "log.txt").read_text()
    assert "autoencoder: done earlier" in log and "transformer: done earlier" in log and "pool: loaded" in log


# ---------------------------------------------------------------------------------------------------
# The model card: the template model_card.md filled from the recorded run
# ---------------------------------------------------------------------------------------------------

EXPECTED_CARDS = Path(__file__).parent / "toy_model_cards"


def _summary(count: int, accuracy=None, strength=None, rgb=None, px=None) -> dict:
    """One entry of evaluate_edits' metrics: accuracy and strength for edited attributes, the errors each
    attribute has (colour edits no size error, size edits no colour error)."""
    out = {"count": count}
    if accuracy is not None:
        out.update(accuracy=accuracy, mean_strength=strength)
    if rgb is not None:
        out["mean_rgb_error"] = rgb
    if px is not None:
        out["mean_size_error_px"] = px
    return out


def _record_a_run(cfg: RecipeConfig) -> tuple[dict, dict, dict]:
    """The files a finished run leaves in its work and model folders, with fixed numbers; returns the
    measured edits and the sliders' results the recipe passes to the card."""
    cfg.workdir.mkdir()
    torch.save({"seconds": 1176.4, "history": [[50, 0.3]]}, cfg.workdir / "ae.pt")
    torch.save({"seconds": 903.1, "history": [[50, 0.1]]}, cfg.workdir / "ae_decoder.pt")
    history = [[50 * (k + 1), 2.5 / (k + 1)] for k in range(20)]
    torch.save({"seconds": 2406.2, "history": history}, cfg.workdir / "flux.pt")
    (cfg.workdir / "autoencoder.json").write_text(
        '{"psnr_db": 35.04, "max_abs_error_8bit": 139.6, "image_error": 1.234, "color_error_mean": 10.95, '
        '"color_error_max": 19.25, "latent_mean": -0.004, "latent_std": 0.9712}')
    torch.save({"pair_source": torch.arange(4800) // 4, "texts": [f"prompt {k}" for k in range(763)]},
               cfg.workdir / "pool.pt")
    (cfg.out / "sub").mkdir(parents=True)
    (cfg.out / "weights.bin").write_bytes(bytes(10_000))
    (cfg.out / "sub" / "more.bin").write_bytes(bytes(4_337))
    metrics = {"scenes": 80, "steps": 12, "guidance": 2.5,
               "edited": _summary(120, 0.875, 0.8123, 17.25, 1.375),
               "edited_color": _summary(40, 0.9, 0.95, rgb=12.04),
               "edited_size": _summary(50, 0.82, 0.7049, px=1.375),
               "edited_brightness": _summary(0),
               "edited_one_edit_prompts": _summary(40, 1.0, 0.99, 10.0, 0.5),
               "edited_two_edit_prompts": _summary(80, 0.8125, 0.7, 20.55, 2.0),
               "two_edit_color": _summary(30, 0.8, 0.9, rgb=14.0),
               "two_edit_size": _summary(50, 0.82, 0.7049, px=1.375),
               "two_edit_brightness": _summary(0),
               "untouched": _summary(200, rgb=3.456, px=0.125)}
    sliders = {"gstlora": {"steps": 800, "loss": 0.012345, "minutes": 6.54},
               "stlora": {"steps": 800, "loss": None, "minutes": None}}
    demo = {"cells": [{}] * 25, "image_error": {"median": 2.345, "max": 3.05},
            "color_error": {"median": 7.25, "max": 12.75}, "cells_meeting_goals": 21}
    return metrics, sliders, demo


@pytest.mark.parametrize("name", ["without_sliders", "with_sliders"])
def test_the_model_card_is_the_text_the_f_string_wrote(tmp_path, monkeypatch, name):
    """A round-trip guard for the move of the card from a 95-line f-string in recipe.py to the templates
    model_card.md and model_card_sliders.md: tests/toy_model_cards/ holds what the f-string wrote for the
    run recorded above (generated once, by the code before the move), and the template must write the
    same bytes. The numbers reach every branch of the card: a table row that measured nothing, rows
    without a colour or a size error, a slider run whose loss was not recorded, flags that differ from
    their defaults, the sliders section present and absent. A deliberate change of the card's text
    regenerates these files (and says so in its commit): issue 23 did (the identity term, the
    new defaults, the demo grid's fidelity, the decoder phase)."""
    monkeypatch.chdir(tmp_path)  # relative folders, as the card quotes --out as given
    cfg = RecipeConfig(out=Path("model"), workdir=Path("work"), seed=3, ae_steps=1500, flux_lr=3e-4,
                       identity_fraction=0.125, slider_steps=400, copy_loss_weight=2.5)
    metrics, sliders, demo = _record_a_run(cfg)
    write_model_card(cfg, metrics, *((sliders, demo) if name == "with_sliders" else (None, None)))
    assert (cfg.out / "README.md").read_bytes().decode() == (EXPECTED_CARDS / f"{name}.md").read_bytes().decode()


# ---------------------------------------------------------------------------------------------------
# The command line: defaults a newcomer can see, and the shipped model left alone unless asked
# ---------------------------------------------------------------------------------------------------

def test_help_shows_the_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps help text (even inside paths) to the terminal width
    for main in (recipe.main, slider_recipe.main):
        with pytest.raises(SystemExit) as exit_:
            main(["--help"])
        assert exit_.value.code == 0
        help_text = " ".join(capsys.readouterr().out.split())
        assert "(default: runs/toy-kontext" in help_text
        if main is recipe.main:
            assert "--flux-steps FLUX_STEPS (default: 9000)" in help_text
            assert "--workdir WORKDIR (default: outputs/toy-kontext-work)" in help_text
        else:
            assert "(default: outputs/toy-sliders-work)" in help_text and "(default: 512)" in help_text


def test_the_shipped_model_is_rewritten_only_when_asked(tmp_path, monkeypatch, capsys):
    """The README's recipe command, run from the repository root, writes a new folder; naming the shipped
    model is refused before any work, unless --replace-shipped says so."""
    def must_not_train(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(recipe, "train_autoencoder", must_not_train)
    monkeypatch.setattr(slider_recipe, "train_sliders", must_not_train)
    monkeypatch.chdir(REPO)
    default = recipe.parse_config([]).out
    assert not default.is_absolute() and default.parts[0] == "runs"  # the .gitignore'd /runs/
    assert "/runs/" in (REPO / ".gitignore").read_text().splitlines()
    assert not slider_recipe.is_shipped_model(default)

    before = {p: p.stat().st_mtime_ns for p in SHIPPED.parent.rglob("*")}
    work = ["--workdir", str(tmp_path / "work")]
    for main, argv in [(recipe.main, ["--out", "assets/toy-kontext", *work]),
                       (recipe.main, ["--out", str(SHIPPED.parent), *work]),
                       (slider_recipe.main, ["--model", "assets/toy-kontext", "--work", str(tmp_path / "work")])]:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert "is the shipped toy model (tracked in git)" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "work").exists()
    with pytest.raises(AssertionError, match="training started"):  # asked explicitly: the recipe starts
        recipe.main(["--out", "assets/toy-kontext", "--replace-shipped", *work])
    with pytest.raises(AssertionError, match="training started"):
        slider_recipe.main(["--model", "assets/toy-kontext", "--replace-shipped", "--work", str(tmp_path / "w2")])
    assert {p: p.stat().st_mtime_ns for p in SHIPPED.parent.rglob("*")} == before

    # The model card's command remakes the model where it is: with the flag for the shipped one.
    assert recipe_command(RecipeConfig(out=Path("assets/toy-kontext"), flux_steps=3)) == \
        "python -m slideredit.toy.recipe --out assets/toy-kontext --replace-shipped --flux-steps 3"
    assert recipe_command(RecipeConfig(out=tmp_path / "m")) == \
        f"python -m slideredit.toy.recipe --out {tmp_path / 'm'}"


@pytest.mark.parametrize("flag, value, message", [
    ("--ae-decoder-batch", "0", "--ae-decoder-batch must be at least 1, got 0"),
    ("--ae-decoder-steps", "-5", "--ae-decoder-steps must be at least 0, got -5"),
    ("--log-every", "0", "--log-every must be at least 1, got 0"),
    ("--seed", "-1", "--seed must be at least 0, got -1"),  # numpy's seed sequences take none below 0
    ("--ae-crop", "60", "--ae-crop must be a multiple of 8 (the latent grid) from 8 to 128, got 60"),
])
def test_bad_counts_are_refused_before_any_work(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_:
        recipe.main(["--out", str(tmp_path / "m"), "--workdir", str(tmp_path / "work"), flag, value])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "work").exists()
    assert recipe.parse_config(["--ae-decoder-steps", "0"]).ae_decoder_steps == 0  # no decoder phase


def test_the_slider_recipe_needs_a_toy_model(tmp_path, capsys):
    with pytest.raises(SystemExit):
        slider_recipe.main(["--model", str(tmp_path / "missing"), "--work", str(tmp_path / "work")])
    assert f"--model {tmp_path / 'missing'}: no toy model there" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()

# ---------------------------------------------------------------------------------------------------
# The shipped slider configs run as shipped: the data command writes what they read
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["gstlora", "stlora"])
def test_the_shipped_config_is_what_the_recipe_writes(method):
    """The files cannot drift from the recipe: same fields, and paths that slider_data and train.py use."""
    text = (SHIPPED / method / "train_config.yaml").read_text()
    assert text == slider_recipe.shipped_config(Path("assets/toy-kontext"), method)
    config = load_config(SHIPPED / method / "train_config.yaml")
    data = config.dataset_name if method == "gstlora" else str(Path(config.images_dataset_path).parent)
    assert Path(data) == slider_data.DEFAULT_OUT and config.pretrained_model_name_or_path == "assets/toy-kontext"
    assert f"python -m slideredit.toy.slider_data --out {slider_data.DEFAULT_OUT} --scenes 512" in text


@pytest.mark.parametrize("method", ["gstlora", "stlora"])
def test_the_data_command_then_train_py_on_the_shipped_config(tmp_path, monkeypatch, method):
    """As the README says, from the repository root (here a copy of its layout): write the data with the
    default command, then train the shipped config (1 step, a smaller batch)."""
    (tmp_path / "assets").symlink_to(REPO / "assets")
    monkeypatch.chdir(tmp_path)
    assert slider_data.main(["--scenes", "3"]) == slider_data.DEFAULT_OUT
    data = tmp_path / slider_data.DEFAULT_OUT
    assert sorted(p.name for p in data.iterdir()) == ["images", "metadata.jsonl", "single_edit_prompts.json"]
    assert len(list((data / "images").iterdir())) == 3

    result = train_script.main(["--config", f"assets/toy-kontext/sliders/{method}/train_config.yaml",
                                "--max_train_steps", "1", "--train_batch_size", "2"])
    out = tmp_path / "outputs" / "toy-sliders-work" / method
    assert result.step == 1 and result.output_dir.resolve() == out and result.unreadable_images == 0
    assert (out / slider_recipe.ADAPTER_FILE[method]).is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["max_train_steps"] == 1


def test_the_data_command_is_the_recipes_data_and_replaces_only_its_own_folder(tmp_path, capsys):
    first = slider_data.write_slider_data(tmp_path / "a", 4)
    (tmp_path / "b").mkdir()
    slider_data.main(["--out", str(tmp_path / "b"), "--scenes", "6"])
    for i in range(4):  # scenes are functions of (seed, number): the first 4 of 6 are the 4
        name = f"images/{i:05d}.png"
        assert (first / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "metadata.jsonl").read_text().splitlines() == \
        (tmp_path / "b" / "metadata.jsonl").read_text().splitlines()[:4]
    slider_data.write_slider_data(tmp_path / "b", 2)  # an earlier toy data folder is replaced, not mixed
    assert len(list((tmp_path / "b" / "images").iterdir())) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "photo.png").write_bytes(b"x")
    with pytest.raises(SystemExit):
        slider_data.main(["--out", str(tmp_path / "mine")])
    assert "is not a toy slider data folder" in capsys.readouterr().err
    assert (tmp_path / "mine" / "photo.png").read_bytes() == b"x"
