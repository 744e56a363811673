"""Stage 1 of the toy recipe (recipe.py): the autoencoder, trained on random crops of rendered scenes and
then on whole images; then its decoder alone, longer, on whole images (the encoder, and so every latent
the transformer learns from, frozen); and its held-out reconstruction report."""
from __future__ import annotations

import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..autoencoder import AutoEncoder
from . import models
from .fidelity import read_fidelity
from .recipe_common import (EVAL_SEED, RecipeConfig, image_row, load_checkpoint, log, lr_at, save_checkpoint, to_images,
                            to_pixels)
from .shapes import (BACKGROUND, CENTER, CENTER_JITTER, IMAGE_SIZE, SHAPES, SOURCE_SIZES, Scene, Shape, make_example,
                     render)


def wide_scene(rng: np.random.Generator) -> Scene:
    """A scene outside the editing distribution: any colours, sizes from a third of the smallest source
    size to the largest that fits its half (what an exaggerated slider can ask for)."""
    shapes = {}
    for kind in SHAPES:
        cx, cy = CENTER[kind]
        dx, dy = rng.integers(-CENTER_JITTER, CENTER_JITTER + 1, size=2)
        largest = 2 * (IMAGE_SIZE // 4 - CENTER_JITTER) if kind == "square" else IMAGE_SIZE // 4 - CENTER_JITTER - 2
        size = float(rng.uniform(SOURCE_SIZES[kind][0] / 3, largest))
        shapes[kind] = Shape(kind, tuple(int(c) for c in rng.integers(0, 256, size=3)), size, (cx + dx, cy + dy))
    return Scene(**shapes)


def autoencoder_batch(cfg: RecipeConfig, step: int, whole_images: int | None = None) -> torch.Tensor:
    """Random crops of renders of the toy world's sources and targets, or (one in four) of wide scenes.
    The last third of the steps sees whole images (as many pixels per step): GroupNorm's statistics span
    the whole image, so the model finishes on the image size it will be used at. With `whole_images`:
    that many whole images (the decoder's refinement)."""
    rng = np.random.default_rng([cfg.seed, 1, step])
    if whole_images is not None:
        crop, count = IMAGE_SIZE, whole_images
    else:
        crop = cfg.ae_crop if step < 2 * cfg.ae_steps // 3 else IMAGE_SIZE
        count = max(1, cfg.ae_batch * cfg.ae_crop ** 2 // crop ** 2)
    crops = []
    for i in range(count):
        if rng.random() < 0.25:
            scene = wide_scene(rng)
        else:
            example = make_example(cfg.seed + 1, step * cfg.ae_batch + i)
            scene = example.target if rng.random() < 0.5 else example.source
        y, x = rng.integers(0, IMAGE_SIZE - crop + 1, size=2) // 8 * 8  # on the latent grid
        crops.append(render(scene)[y:y + crop, x:x + crop])
    return to_pixels(crops)


def train_autoencoder(cfg: RecipeConfig) -> AutoEncoder:
    """The whole autoencoder for cfg.ae_steps, then its decoder alone for cfg.ae_decoder_steps.

    Why the second phase: after the first, flat colours decode 16 RGB off (pulled towards the palette)
    and neither less latent noise nor a colour loss moved that (benchmarks/RESULTS.md); what moved it was
    training the decoder longer, on whole images, down to a low learning rate. Freezing the encoder keeps
    the latents the transformer and the sliders learn from exactly as they were, so the phase can be
    added (or lengthened) under a trained transformer."""
    ae = models.build_autoencoder(cfg.seed)
    if (done := load_checkpoint(cfg.workdir / "ae_decoder.pt")) is not None:
        ae.load_state_dict(done["model"])
        log(cfg, "autoencoder: done earlier, loaded")
        return ae.eval().requires_grad_(False)
    if (done := load_checkpoint(cfg.workdir / "ae.pt")) is not None:
        ae.load_state_dict(done["model"])
        log(cfg, "autoencoder: done earlier, loaded; its decoder is refined next")
    else:
        _train(cfg, ae, "ae", cfg.ae_steps, cfg.ae_lr)
    _train(cfg, ae, "ae_decoder", cfg.ae_decoder_steps, cfg.ae_decoder_lr, decoder_only=True)
    ae.eval().requires_grad_(False)
    report_autoencoder(cfg, ae)
    return ae


def _train(cfg: RecipeConfig, ae: AutoEncoder, name: str, steps: int, peak_lr: float, decoder_only: bool = False) -> None:
    """Train the autoencoder (or with `decoder_only` its decoder, on batches of cfg.ae_decoder_batch whole
    images) for `steps` steps, resumably: cfg.workdir/<name>.ckpt while running, <name>.pt (the weights,
    seconds and loss history) when done. The decoder's phase continues the first phase's data and noise
    streams (its step s is their step cfg.ae_steps + s); its latents need no graph, and the moment penalty,
    which only the encoder can meet, is left out of its loss."""
    params = list((ae.decoder if decoder_only else ae).parameters())
    label, offset = ("decoder", cfg.ae_steps) if decoder_only else ("autoencoder", 0)
    opt = torch.optim.AdamW(params, lr=peak_lr, weight_decay=0.0)
    ckpt_path, start = cfg.workdir / f"{name}.ckpt", 0
    if (state := load_checkpoint(ckpt_path)) is not None:
        ae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
        log(cfg, f"{label}: resuming at step {start}")
    background = torch.tensor(BACKGROUND, dtype=torch.float32)[None, :, None, None] / 127.5 - 1
    t0, seen = time.time() - (state["seconds"] if state else 0.0), 0.0
    history = state["history"] if state else []  # [step, mean reconstruction loss since the last entry]
    for step in range(start, steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr, 50)
        x = autoencoder_batch(cfg, offset + step, cfg.ae_decoder_batch if decoder_only else None)
        noise = torch.randn(x.shape[0], ae.params.z_channels, x.shape[2] // 8, x.shape[3] // 8,
                            generator=torch.Generator().manual_seed(cfg.seed * 100_003 + offset + step))
        with torch.set_grad_enabled(not decoder_only):
            z = ae.encode(x)  # (B, 16, h, w), scaled and shifted as the transformer sees it
        recon = ae.decode(z + cfg.ae_latent_noise * noise)
        # Shapes cover a tenth of an image; weighting their pixels up makes their colour matter as much as
        # the background does.
        weight = 1 + (cfg.ae_shape_weight - 1) * (x - background).abs().amax(dim=1, keepdim=True).gt(0).float()
        error = recon - x
        rec_loss = ((error.abs() + error.pow(2)) * weight).mean() / weight.mean()
        mean, var = z.mean(dim=(0, 2, 3)), z.var(dim=(0, 2, 3))
        moment_loss = (mean.pow(2) + (var - 1).pow(2)).mean()
        loss = rec_loss if decoder_only else rec_loss + cfg.ae_moment_weight * moment_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        seen += rec_loss.item()
        if (step + 1) % cfg.log_every == 0:
            history.append([step + 1, seen / cfg.log_every])
            moments = "" if decoder_only else (f" moments {moment_loss.item():.3f} (latent mean "
                                               f"{mean.abs().mean():.2f}, var {var.mean():.2f})")
            log(cfg, f"{label} step {step + 1}/{steps}: recon {seen / cfg.log_every:.4f}{moments} "
                     f"{(time.time() - t0) / (step + 1):.2f} s/step")
            seen = 0.0
        if (step + 1) % cfg.checkpoint_every == 0:
            save_checkpoint(ckpt_path, {"model": ae.state_dict(), "optimizer": opt.state_dict(), "step": step + 1,
                                        "seconds": time.time() - t0, "history": history})
    save_checkpoint(cfg.workdir / f"{name}.pt", {"model": ae.state_dict(), "seconds": time.time() - t0,
                                                 "history": history})
    ckpt_path.unlink(missing_ok=True)


@torch.no_grad()
def report_autoencoder(cfg: RecipeConfig, ae: AutoEncoder) -> dict:
    """Reconstruction error, fidelity (fidelity.py: the mean |RGB| image error and the worse shape's
    core-colour error, per scene) and latent statistics on full-size held-out scenes; a picture of both."""
    examples = [make_example(EVAL_SEED + 1, i) for i in range(16)]
    scenes = [e.target if i % 2 else e.source for i, e in enumerate(examples)]
    x = to_pixels([render(scene) for scene in scenes])
    z = ae.encode(x)
    recon = ae.decode(z).clamp(-1, 1)
    images = to_images(recon)
    fidelity = [read_fidelity(image, scene, []) for image, scene in zip(images, scenes)]
    stats = {"psnr_db": float(10 * math.log10(4 / F.mse_loss(recon, x).item())),
             "max_abs_error_8bit": float((recon - x).abs().max() * 127.5),
             "image_error": float(np.mean([f.image_error for f in fidelity])),
             "color_error_mean": float(np.mean([f.color_error for f in fidelity])),
             "color_error_max": max(f.color_error for f in fidelity),
             "latent_mean": float(z.mean()), "latent_std": float(z.std())}
    (cfg.workdir / "autoencoder.json").write_text(json.dumps(stats, indent=2))
    picture = Image.new("RGB", (8 * IMAGE_SIZE, 2 * IMAGE_SIZE))
    picture.paste(image_row(to_images(x[:8])), (0, 0))
    picture.paste(image_row(images[:8]), (0, IMAGE_SIZE))
    picture.save(cfg.workdir / "autoencoder.png")
    log(cfg, f"autoencoder: {stats}")
    return stats
