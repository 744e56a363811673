"""Train the toy Kontext model on a CPU and write its model folder.

    python -m slideredit.toy.recipe --threads 2    # writes the model folder runs/toy-kontext (--out)

The shipped model, assets/toy-kontext (tracked in git), is rewritten only when asked:
`--out assets/toy-kontext --replace-shipped`.

Four resumable stages; each keeps its state in --workdir (default outputs/toy-kontext-work), so a killed
run picks up where it stopped, and a finished stage is skipped:

1. autoencoder (autoencoder_training.py): random 64x64 crops of rendered scenes, then whole images for
   the last third of the steps (GroupNorm's statistics span the image); the scenes come from the toy
   world, and one in four has any colours and a wider range of sizes, so colours and sizes between or
   beyond the edits decode too.
   Loss: L1 + MSE of the reconstruction from a slightly noised latent (the decoder must forgive the
   transformer's errors), shape pixels weighted up (their colours are most of what there is to learn),
   plus a penalty that keeps each latent channel at zero mean and unit variance under FLUX's fixed scale
   and shift (ae.safetensors has no place to record others). Then the decoder alone, longer, on whole
   images, the encoder frozen: flat colours come out as they went in, and no latent moves.
2. pool (transformer_training.py): source scenes, each with a few random edits, rendered and encoded
   once; the frozen T5 and CLIP encode every instruction once.
3. transformer (transformer_training.py): Kontext's rectified-flow objective. x0 = target latents
   (packed), z = (1 - t) x0 + t e, the model sees [z ; source latents] with position ids (0, r, c) and
   (1, r, c) and the T5 tokens of the instruction, and regresses v = e - x0 on the noisy tokens, the
   tokens the edit changes weighted up and the others by an identity term (`token_weights`: the clean
   latent the prediction implies must be the source's where the edit changes nothing). t =
   sigmoid(N(mu, 1)), mu the shift the pipeline's schedule uses for 64 tokens (so training spends its
   time where sampling does).
   Identity pairs ("keep the image the same", and "") are mixed in: GSTLoRA's teacher prompt and
   STLoRA's fully suppressed prompt must leave the image as it is. The guidance input is drawn from
   [1, 5] (there is no guidance teacher, so the model learns to ignore it), and CLIP's pooled vector is
   that of a random other instruction: the model must read the edit from the T5 tokens, the only place
   STLoRA's per-token sliders act. T5 trains with the transformer: the transformer's text tokens carry
   no positions (their RoPE ids are zero), so which shape a colour word belongs to in "make the square
   red and make the circle larger" must come from T5, and a random T5 carries too little of it. CLIP
   stays frozen at its random initialisation. AdamW, warm-up then cosine decay, gradient clipping, and
   an EMA of the weights (transformer and T5), which is what ships.
4. folder (model_folder.py): the model folder (save_model_folder), an example scene and prompts, the
   measured edit accuracy through SliderEditFluxKontextPipeline (edit_evaluation.py), and the model card
   (model_card.py, filling the template model_card.md).

Then the sliders (slider_recipe.py) train on the finished folder, and the model card gains them.

Everything is seeded; the data of step s is a pure function of (seed, s), so a resumed run sees the same
batches as an uninterrupted one.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from . import models
from .autoencoder_training import train_autoencoder
from .demo_grid import measure_demo_grid
from .model_card import write_model_card
from .model_folder import write_folder
from .recipe_common import RecipeConfig, log
from .shapes import IMAGE_SIZE
from .slider_recipe import check_not_shipped, train_sliders
from .transformer_training import build_pool, train_flux, with_t5


# Settings that count things per step or divide the step number: 0 has no meaning for them.
AT_LEAST_ONE = {"threads", "ae_batch", "ae_decoder_batch", "edits_per_source", "flux_batch", "checkpoint_every",
                "sample_every", "log_every", "eval_steps"}


def parse_config(argv: list[str] | None = None) -> RecipeConfig:
    """The recipe's fields from the command line (every field is a flag), checked before anything runs."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in asdict(RecipeConfig()).items():
        kind = Path if isinstance(value, Path) else type(value)
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=value, help="(default: %(default)s)")
    parser.add_argument("--replace-shipped", action="store_true",
                        help="allow --out to be the shipped model, assets/toy-kontext (tracked in git)")
    args = vars(parser.parse_args(argv))
    replace_shipped = args.pop("replace_shipped")
    cfg = RecipeConfig(**args)
    check_not_shipped(parser, "--out", cfg.out, replace_shipped)
    if cfg.save_dtype not in ("float32", "bfloat16"):
        parser.error(f"--save-dtype must be float32 or bfloat16, got {cfg.save_dtype!r}")
    for name, value in asdict(cfg).items():  # counts: a bad one would fail deep inside a stage, hours in
        least = 1 if name in AT_LEAST_ONE else 0
        if isinstance(value, int) and value < least:
            parser.error(f"--{name.replace('_', '-')} must be at least {least}, got {value}")
    if cfg.ae_crop % 8 or not 8 <= cfg.ae_crop <= IMAGE_SIZE:
        parser.error(f"--ae-crop must be a multiple of 8 (the latent grid) from 8 to {IMAGE_SIZE}, got {cfg.ae_crop}")
    return cfg


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(argv)
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    (cfg.workdir / "config.json").write_text(json.dumps(asdict(cfg), default=str, indent=2))

    timings = {}
    t0 = time.time()
    ae = train_autoencoder(cfg)
    timings["autoencoder_s"] = time.time() - t0
    encoders = models.build_text_encoders(cfg.seed)
    t0 = time.time()
    pool = build_pool(cfg, ae, encoders)
    timings["pool_s"] = time.time() - t0
    t0 = time.time()
    trained = train_flux(cfg, pool, ae, encoders)
    timings["transformer_s"] = time.time() - t0
    metrics = write_folder(cfg, trained["flux"], ae, with_t5(encoders, trained["t5"]))
    t0 = time.time()
    sliders = train_sliders(cfg.out, cfg.workdir / "sliders", cfg.slider_scenes, cfg.slider_steps)  # GSTLoRA and STLoRA
    timings["sliders_s"] = time.time() - t0
    (cfg.workdir / "sliders.json").write_text(json.dumps(sliders, indent=2))
    demo = measure_demo_grid(cfg.out)
    (cfg.workdir / "demo_grid.json").write_text(json.dumps(demo, indent=2))
    log(cfg, f"demo grid fidelity: image error median {demo['image_error']['median']:.2f} max "
             f"{demo['image_error']['max']:.2f}, core colour median {demo['color_error']['median']:.1f} max "
             f"{demo['color_error']['max']:.1f}, {demo['cells_meeting_goals']} of 25 cells meet both goals")
    write_model_card(cfg, metrics, sliders, demo)
    log(cfg, f"done: {cfg.out} ({json.dumps(timings)})")
    return metrics


if __name__ == "__main__":
    main()
