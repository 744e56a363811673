"""Stage 1 of the toy recipe (recipe.py): the autoencoder, trained on random crops of rendered scenes and
then on whole images, and its held-out reconstruction report."""
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


def autoencoder_batch(cfg: RecipeConfig, step: int) -> torch.Tensor:
    """Random crops of renders of the toy world's sources and targets, or (one in four) of wide scenes.
    The last third of the steps sees whole images (as many pixels per step): GroupNorm's statistics span
    the whole image, so the model finishes on the image size it will be used at."""
    rng = np.random.default_rng([cfg.seed, 1, step])
    crop = cfg.ae_crop if step < 2 * cfg.ae_steps // 3 else IMAGE_SIZE
    crops = []
    for i in range(max(1, cfg.ae_batch * cfg.ae_crop ** 2 // crop ** 2)):
        if rng.random() < 0.25:
            scene = wide_scene(rng)
        else:
            example = make_example(cfg.seed + 1, step * cfg.ae_batch + i)
            scene = example.target if rng.random() < 0.5 else example.source
        y, x = rng.integers(0, IMAGE_SIZE - crop + 1, size=2) // 8 * 8  # on the latent grid
        crops.append(render(scene)[y:y + crop, x:x + crop])
    return to_pixels(crops)


def train_autoencoder(cfg: RecipeConfig) -> AutoEncoder:
    final = cfg.workdir / "ae.pt"
    ae = models.build_autoencoder(cfg.seed)
    done = load_checkpoint(final)
    if done is not None:
        ae.load_state_dict(done["model"])
        log(cfg, "autoencoder: done earlier, loaded")
        return ae.eval().requires_grad_(False)

    opt = torch.optim.AdamW(ae.parameters(), lr=cfg.ae_lr, weight_decay=0.0)
    ckpt_path, start = cfg.workdir / "ae.ckpt", 0
    if (state := load_checkpoint(ckpt_path)) is not None:
        ae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
        log(cfg, f"autoencoder: resuming at step {start}")
    p = ae.params
    background = torch.tensor(BACKGROUND, dtype=torch.float32)[None, :, None, None] / 127.5 - 1
    t0, seen = time.time() - (state["seconds"] if state else 0.0), 0.0
    history = state["history"] if state else []  # [step, mean reconstruction loss since the last entry]
    for step in range(start, cfg.ae_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.ae_steps, cfg.ae_lr, 50)
        x = autoencoder_batch(cfg, step)
        noise = torch.randn(x.shape[0], p.z_channels, x.shape[2] // 8, x.shape[3] // 8,
                            generator=torch.Generator().manual_seed(cfg.seed * 100_003 + step))
        z = ae.encode(x)  # (B, 16, h, w), scaled and shifted as the transformer sees it
        recon = ae.decode(z + cfg.ae_latent_noise * noise)
        # Shapes cover a tenth of an image; weighting their pixels up makes their colour matter as much as
        # the background does.
        weight = 1 + (cfg.ae_shape_weight - 1) * (x - background).abs().amax(dim=1, keepdim=True).gt(0).float()
        error = recon - x
        rec_loss = ((error.abs() + error.pow(2)) * weight).mean() / weight.mean()
        mean, var = z.mean(dim=(0, 2, 3)), z.var(dim=(0, 2, 3))
        moment_loss = (mean.pow(2) + (var - 1).pow(2)).mean()
        loss = rec_loss + cfg.ae_moment_weight * moment_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
        seen += rec_loss.item()
        if (step + 1) % cfg.log_every == 0:
            history.append([step + 1, seen / cfg.log_every])
            log(cfg, f"autoencoder step {step + 1}/{cfg.ae_steps}: recon {seen / cfg.log_every:.4f} "
                     f"moments {moment_loss.item():.3f} (latent mean {mean.abs().mean():.2f}, var {var.mean():.2f}) "
                     f"{(time.time() - t0) / (step + 1):.2f} s/step")
            seen = 0.0
        if (step + 1) % cfg.checkpoint_every == 0:
            save_checkpoint(ckpt_path, {"model": ae.state_dict(), "optimizer": opt.state_dict(), "step": step + 1,
                                        "seconds": time.time() - t0, "history": history})
    save_checkpoint(final, {"model": ae.state_dict(), "seconds": time.time() - t0, "history": history})
    ckpt_path.unlink(missing_ok=True)
    ae.eval().requires_grad_(False)
    report_autoencoder(cfg, ae)
    return ae


@torch.no_grad()
def report_autoencoder(cfg: RecipeConfig, ae: AutoEncoder) -> dict:
    """Reconstruction error and latent statistics on full-size held-out scenes; a picture of both."""
    examples = [make_example(EVAL_SEED + 1, i) for i in range(16)]
    x = to_pixels([render(e.target if i % 2 else e.source) for i, e in enumerate(examples)])
    z = ae.encode(x)
    recon = ae.decode(z).clamp(-1, 1)
    stats = {"psnr_db": float(10 * math.log10(4 / F.mse_loss(recon, x).item())),
             "max_abs_error_8bit": float((recon - x).abs().max() * 127.5),
             "latent_mean": float(z.mean()), "latent_std": float(z.std())}
    (cfg.workdir / "autoencoder.json").write_text(json.dumps(stats, indent=2))
    picture = Image.new("RGB", (8 * IMAGE_SIZE, 2 * IMAGE_SIZE))
    picture.paste(image_row(to_images(x[:8])), (0, 0))
    picture.paste(image_row(to_images(recon[:8])), (0, IMAGE_SIZE))
    picture.save(cfg.workdir / "autoencoder.png")
    log(cfg, f"autoencoder: {stats}")
    return stats
