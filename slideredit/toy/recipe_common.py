"""What the toy recipe's stages share: its settings, its work folder (log and resumable checkpoints), the
learning-rate schedule and the conversions between rendered images and pixel tensors."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..atomic import atomic_path
from .slider_recipe import DEFAULT_MODEL, is_shipped_model

EVAL_SEED = 10_000  # evaluation scenes come from their own stream, never from the training streams


@dataclass
class RecipeConfig:
    out: Path = DEFAULT_MODEL
    workdir: Path = Path("outputs/toy-kontext-work")
    seed: int = 0
    threads: int = 1
    # autoencoder
    ae_steps: int = 2000
    ae_batch: int = 8
    ae_crop: int = 64
    ae_lr: float = 2e-3
    ae_latent_noise: float = 0.1
    ae_moment_weight: float = 0.05
    ae_shape_weight: float = 10.0
    ae_decoder_steps: int = 3000  # then the decoder alone, encoder frozen (autoencoder_training.py)
    ae_decoder_batch: int = 4  # whole images
    ae_decoder_lr: float = 5e-4
    # training pool
    pool_sources: int = 1200
    edits_per_source: int = 4
    # transformer
    flux_steps: int = 9000
    flux_batch: int = 16
    flux_lr: float = 5e-4
    flux_warmup: int = 200
    edit_loss_weight: float = 4.0  # tokens the edit changes count this many times in the loss
    copy_loss_weight: float = 0.0  # an identity term on the tokens it leaves alone (token_weights); 3 measured
    identity_fraction: float = 0.1
    ema_decay: float = 0.999
    # sliders (train.py's trainer)
    slider_scenes: int = 512
    slider_steps: int = 800
    # bookkeeping
    checkpoint_every: int = 250
    sample_every: int = 1000
    log_every: int = 50
    eval_examples: int = 40
    eval_steps: int = 12
    save_dtype: str = "float32"  # bfloat16 halves the folder; the measured edits were the same


def recipe_command(cfg: RecipeConfig) -> str:
    """The command that made `cfg`'s model: --out (and --replace-shipped for the shipped model), then every
    field that differs from its default."""
    return "python -m slideredit.toy.recipe --out " + str(cfg.out) + (
        " --replace-shipped" if is_shipped_model(cfg.out) else "") + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in asdict(cfg).items()
        if k not in ("out", "workdir") and v != getattr(RecipeConfig(), k))



def log(cfg: RecipeConfig, message: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {message}"
    print(line, flush=True)
    with open(cfg.workdir / "log.txt", "a") as f:
        f.write(line + "\n")


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict | None:
    return torch.load(path, weights_only=True) if path.is_file() else None


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def to_pixels(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) arrays -> (B, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_images(pixels: torch.Tensor) -> list[Image.Image]:
    arrays = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arrays]


def image_row(images: list[Image.Image]) -> Image.Image:
    row = Image.new("RGB", (sum(i.width for i in images), images[0].height))
    for k, image in enumerate(images):
        row.paste(image, (k * image.width, 0))
    return row
