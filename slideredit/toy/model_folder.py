"""Stage 4 of the toy recipe (recipe.py): the model folder, with its example scene and prompts, the edits
measured through the pipeline, and the model card."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..autoencoder import AutoEncoder
from ..text_encoders import KontextTextEncoders
from ..transformer import Flux
from . import models
from .edit_evaluation import evaluate_edits
from .model_card import write_model_card
from .recipe_common import EVAL_SEED, RecipeConfig, log
from .shapes import SOURCE_SIZES, make_example, nearest_color, render_image, scene_to_dict

# The demo: two continuous edits (brightness and size), so each slider can exaggerate as well as suppress.
EXAMPLE_PROMPTS = [
    "make the square darker", "make the circle larger", "make the square darker and make the circle larger",
]


def write_example(out: Path, seed: int, steps: int) -> None:
    """example.png: a source scene whose square is not blue (the darkest colour, where "darker" shows
    least) and whose circle is small (room to exaggerate "larger"); example.json: its default prompts and
    the number of sampling steps the model card's measurements used."""
    index = 0
    while True:
        scene = make_example(seed, index, num_edits=0).source
        if nearest_color(scene.square.color) != "blue" and scene.circle.size < sum(SOURCE_SIZES["circle"]) / 2:
            break
        index += 1
    render_image(scene).save(out / "example.png")
    example = {"prompt": EXAMPLE_PROMPTS[-1], "subprompts": EXAMPLE_PROMPTS[:2], "prompts": EXAMPLE_PROMPTS,
               "scene": scene_to_dict(scene), "steps": steps}
    (out / "example.json").write_text(json.dumps(example, indent=2) + "\n")


def write_folder(cfg: RecipeConfig, flux: Flux, ae: AutoEncoder, encoders: KontextTextEncoders) -> dict:
    """Write the model folder cfg.out from the trained models, its example, and its card from the edits
    measured through the pipeline (also in cfg.workdir/eval.json); returns those measurements."""
    out = cfg.out
    models.save_model_folder(out, flux, ae, encoders, dtype=getattr(torch, cfg.save_dtype))
    write_example(out, EVAL_SEED + 7, cfg.eval_steps)
    t0 = time.time()
    metrics = evaluate_edits(out, cfg.eval_examples, cfg.eval_steps)
    metrics["seconds"] = time.time() - t0
    (cfg.workdir / "eval.json").write_text(json.dumps(metrics, indent=2))
    log(cfg, f"evaluation through the pipeline: {json.dumps(metrics)}")
    write_model_card(cfg, metrics)
    return metrics
