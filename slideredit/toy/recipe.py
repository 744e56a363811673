"""Train the toy Kontext model on a CPU and write its model folder.

    python -m slideredit.toy.recipe --threads 2    # writes the model folder runs/toy-kontext (--out)

The shipped model, assets/toy-kontext (tracked in git), is rewritten only when asked:
`--out assets/toy-kontext --replace-shipped`.

Four resumable stages; each keeps its state in --workdir (default outputs/toy-kontext-work), so a killed
run picks up where it stopped, and a finished stage is skipped:

1. autoencoder: random 64x64 crops of rendered scenes, then whole images for the last third of the steps
   (GroupNorm's statistics span the image); the scenes come from the toy world, and one in four has any
   colours and a wider range of sizes, so colours and sizes between or beyond the edits decode too.
   Loss: L1 + MSE of the reconstruction from a slightly noised latent (the decoder must forgive the
   transformer's errors), shape pixels weighted up (their colours are most of what there is to learn),
   plus a penalty that keeps each latent channel at zero mean and unit variance under FLUX's fixed scale
   and shift (ae.safetensors has no place to record others).
2. pool: source scenes, each with a few random edits, rendered and encoded once; the frozen T5 and
   CLIP encode every instruction once.
3. transformer: Kontext's rectified-flow objective. x0 = target latents (packed), z = (1 - t) x0 + t e,
   the model sees [z ; source latents] with position ids (0, r, c) and (1, r, c) and the T5 tokens of
   the instruction, and regresses v = e - x0 on the noisy tokens, the tokens the edit changes weighted
   up (`token_weights`). t = sigmoid(N(mu, 1)), mu the shift
   the pipeline's schedule uses for 64 tokens (so training spends its time where sampling does).
   Identity pairs ("keep the image the same", and "") are mixed in: GSTLoRA's teacher prompt and
   STLoRA's fully suppressed prompt must leave the image as it is. The guidance input is drawn from
   [1, 5] (there is no guidance teacher, so the model learns to ignore it), and CLIP's pooled vector is
   that of a random other instruction: the model must read the edit from the T5 tokens, the only place
   STLoRA's per-token sliders act. T5 trains with the transformer: the transformer's text tokens carry
   no positions (their RoPE ids are zero), so which shape a colour word belongs to in "make the square
   red and make the circle larger" must come from T5, and a random T5 carries too little of it. CLIP
   stays frozen at its random initialisation. AdamW, warm-up then cosine decay, gradient clipping, and
   an EMA of the weights (transformer and T5), which is what ships.
4. folder: the model folder (save_model_folder), an example scene and prompts, the measured edit
   accuracy through SliderEditFluxKontextPipeline, and the model card.

Everything is seeded; the data of step s is a pure function of (seed, s), so a resumed run sees the same
batches as an uninterrupted one.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..atomic import atomic_path
from ..autoencoder import AutoEncoder
from ..sampling import compute_mu, denoise, get_schedule, latent_ids, pack_latents, text_ids, unpack_latents
from ..text_encoders import KontextTextEncoders
from ..transformer import Flux
from . import models
from .slider_recipe import DEFAULT_MODEL, check_not_shipped, is_shipped_model, train_sliders
from .shapes import (BACKGROUND, CENTER, CENTER_JITTER, COLORS, IMAGE_SIZE, INDEPENDENT_EDITS, NEUTRAL_PROMPT, SHAPES,
                     SOURCE_SIZES, Edit, Scene,
                     Shape, ToyExample, edit_strength, join_instructions, make_example, nearest_color, random_edits,
                     random_scene, read_shape, render, render_image, scene_to_dict)

EDIT_ATTRIBUTES = ("color", "size", "brightness")
EVAL_SEED = 10_000  # evaluation scenes come from their own stream, never from the training streams
# The demo: two continuous edits (brightness and size), so each slider can exaggerate as well as suppress.
EXAMPLE_PROMPTS = ["make the square darker", "make the circle larger", "make the square darker and make the circle larger"]


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
    # training pool
    pool_sources: int = 1200
    edits_per_source: int = 4
    # transformer
    flux_steps: int = 9000
    flux_batch: int = 16
    flux_lr: float = 5e-4
    flux_warmup: int = 200
    edit_loss_weight: float = 4.0  # tokens the edit changes count this many times in the loss
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


# ---------------------------------------------------------------------------------------------------
# Stage 1: the autoencoder
# ---------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------
# Stage 2: the training pool
# ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def encode_images(ae: AutoEncoder, scenes: list[Scene], batch: int = 32) -> torch.Tensor:
    """Scenes -> packed latents (N, 64, 64)."""
    out = []
    for i in range(0, len(scenes), batch):
        out.append(pack_latents(ae.encode(to_pixels([render(s) for s in scenes[i:i + batch]]))))
    return torch.cat(out)


@torch.no_grad()
def build_pool(cfg: RecipeConfig, ae: AutoEncoder, encoders: KontextTextEncoders) -> dict:
    path = cfg.workdir / "pool.pt"
    if (pool := load_checkpoint(path)) is not None:
        log(cfg, f"pool: loaded {len(pool['pair_source'])} pairs")
        return pool
    t0 = time.time()
    sources, targets, pair_source, instructions = [], [], [], []
    for i in range(cfg.pool_sources):
        rng = np.random.default_rng([cfg.seed, 2, i])
        scene = random_scene(rng)
        sources.append(scene)
        for _ in range(cfg.edits_per_source):
            edits = random_edits(rng, scene, 1 + int(rng.choice(3, p=(0.35, 0.45, 0.2))))
            example = ToyExample(scene, edits)
            targets.append(example.target)
            pair_source.append(i)
            instructions.append(example.instruction)
    source_latents = encode_images(ae, sources)
    target_latents = encode_images(ae, targets)
    texts = sorted(set(instructions) | {NEUTRAL_PROMPT, ""})
    _, pooled = encoders.encode(texts, max_length=models.MAX_SEQUENCE_LENGTH)
    t5_ids = encoders.t5_tokenizer(texts, padding="max_length", max_length=models.MAX_SEQUENCE_LENGTH,
                                   truncation=True, return_tensors="pt").input_ids
    index = {t: k for k, t in enumerate(texts)}
    pool = {"source_latents": source_latents, "target_latents": target_latents,
            "pair_source": torch.tensor(pair_source), "pair_text": torch.tensor([index[t] for t in instructions]),
            "texts": texts, "t5_ids": t5_ids, "pooled": pooled.float(),
            "identity_text": torch.tensor([index[NEUTRAL_PROMPT], index[""]])}
    save_checkpoint(path, pool)
    log(cfg, f"pool: {len(sources)} sources, {len(targets)} edited targets, {len(texts)} distinct prompts, "
             f"latent std {source_latents.std():.3f}, {time.time() - t0:.0f} s")
    return pool


# ---------------------------------------------------------------------------------------------------
# Stage 3: the transformer
# ---------------------------------------------------------------------------------------------------

def flux_batch(cfg: RecipeConfig, pool: dict, step: int) -> dict:
    """The batch of one step, a pure function of (seed, step)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    b = cfg.flux_batch
    pairs = torch.randint(len(pool["pair_source"]), (b,), generator=g)
    src_index = pool["pair_source"][pairs]
    cond = pool["source_latents"][src_index]
    x0 = pool["target_latents"][pairs].clone()
    text = pool["pair_text"][pairs].clone()
    identity = torch.rand(b, generator=g) < cfg.identity_fraction
    x0[identity] = cond[identity]
    text[identity] = pool["identity_text"][torch.randint(2, (int(identity.sum()),), generator=g)]
    mu = compute_mu(x0.shape[1])
    t = torch.sigmoid(mu + torch.randn(b, generator=g))
    noise = torch.randn(x0.shape, generator=g)
    return {"x0": x0, "cond": cond, "noise": noise, "t": t, "t5_ids": pool["t5_ids"][text],
            "pooled": pool["pooled"][torch.randint(len(pool["texts"]), (b,), generator=g)],
            "guidance": 1 + 4 * torch.rand(b, generator=g)}


# A token whose target latent differs from its source latent by this mean square (the latents have unit
# variance) or more is an edited token; below it, its weight ramps linearly from 1.
EDITED_TOKEN_MSE = 0.05


def token_weights(x0: torch.Tensor, cond: torch.Tensor, edit_weight: float) -> torch.Tensor:
    """(B, N) loss weight per target token: 1 where the edit leaves the source as it is, `edit_weight`
    where it changes it. An edit touches a few of the 64 tokens (a shape's colour, a ring of size); with
    uniform weights the loss is mostly about copying the rest, and the edits of two-edit prompts came
    out weak."""
    changed = ((x0 - cond).pow(2).mean(dim=-1) / EDITED_TOKEN_MSE).clamp(max=1.0)
    return 1 + (edit_weight - 1) * changed


def flux_loss(model: Flux, t5: torch.nn.Module, batch: dict, edit_weight: float = 1.0) -> torch.Tensor:
    x0, cond, noise, t = batch["x0"], batch["cond"], batch["noise"], batch["t"]
    b, n = x0.shape[:2]
    side = int(math.isqrt(n))
    z = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    ids = torch.cat([latent_ids(b, side, side, 0), latent_ids(b, side, side, 1)], dim=1)
    txt = t5(batch["t5_ids"]).last_hidden_state  # no attention mask, as KontextTextEncoders.encode
    pred = model(img=torch.cat([z, cond], dim=1), img_ids=ids, txt=txt, txt_ids=text_ids(b, txt.shape[1]),
                 timesteps=t, y=batch["pooled"], guidance=batch["guidance"])
    weights = token_weights(x0, cond, edit_weight)
    return ((pred[:, :n] - (noise - x0)).pow(2).mean(dim=-1) * weights).sum() / weights.sum()


@torch.no_grad()
def edit_latents(model: Flux, cond: torch.Tensor, txt: torch.Tensor, pooled: torch.Tensor, steps: int,
                 seed: int) -> torch.Tensor:
    """Sample edits directly (as the pipeline does, without the image and text encoding)."""
    b, n = cond.shape[:2]
    side = int(math.isqrt(n))
    noise = torch.randn(cond.shape, generator=torch.Generator().manual_seed(seed))
    return denoise(model, noise, latent_ids(b, side, side, 0), txt, text_ids(b, txt.shape[1]), pooled,
                   get_schedule(steps, n), models.GUIDANCE, cond=cond, cond_ids=latent_ids(b, side, side, 1),
                   progress=False)


@torch.no_grad()
def sample_edits(cfg: RecipeConfig, model: Flux, ae: AutoEncoder, encoders: KontextTextEncoders, step: int) -> float:
    """Edit 8 held-out scenes; save source / target / edit rows; return the mean edit strength."""
    examples = [make_example(EVAL_SEED, i, num_edits=1 + i % 2) for i in range(8)]
    cond = encode_images(ae, [e.source for e in examples])
    txt, pooled = encoders.encode([e.instruction for e in examples], max_length=models.MAX_SEQUENCE_LENGTH)
    edited = to_images(ae.decode(unpack_latents(edit_latents(model, cond, txt, pooled, cfg.eval_steps, 0),
                                                IMAGE_SIZE, IMAGE_SIZE)))
    picture = Image.new("RGB", (8 * IMAGE_SIZE, 3 * IMAGE_SIZE))
    picture.paste(image_row([render_image(e.source) for e in examples]), (0, 0))
    picture.paste(image_row([render_image(e.target) for e in examples]), (0, IMAGE_SIZE))
    picture.paste(image_row(edited), (0, 2 * IMAGE_SIZE))
    (cfg.workdir / "samples").mkdir(exist_ok=True)
    picture.save(cfg.workdir / "samples" / f"step_{step:05d}.png")
    strengths = [edit_strength(image, e.source, edit) for image, e in zip(edited, examples) for edit in e.edits]
    return float(np.mean(strengths))


def train_flux(cfg: RecipeConfig, pool: dict, ae: AutoEncoder, encoders: KontextTextEncoders) -> nn.ModuleDict:
    """Train the transformer and T5 together from `build_flux` and `encoders.t5`; returns the EMA of
    both as {"flux": Flux, "t5": T5EncoderModel}, frozen."""
    def build() -> nn.ModuleDict:
        return nn.ModuleDict({"flux": models.build_flux(cfg.seed), "t5": copy.deepcopy(encoders.t5)})

    final = cfg.workdir / "flux.pt"
    student = build()
    if (done := load_checkpoint(final)) is not None:
        student.load_state_dict(done["ema"])
        log(cfg, "transformer: done earlier, loaded")
        return student.eval().requires_grad_(False)

    student.train().requires_grad_(True)
    ema = build().eval().requires_grad_(False)
    ema.load_state_dict(student.state_dict())
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.flux_lr, betas=(0.9, 0.99), weight_decay=0.01)
    ckpt_path, start, seconds, history = cfg.workdir / "flux.ckpt", 0, 0.0, []
    if (state := load_checkpoint(ckpt_path)) is not None:
        student.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        start, seconds, history = state["step"], state["seconds"], state["history"]
        log(cfg, f"transformer: resuming at step {start}")
    t0, seen = time.time() - seconds, 0.0
    for step in range(start, cfg.flux_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.flux_steps, cfg.flux_lr, cfg.flux_warmup)
        loss = flux_loss(student["flux"], student["t5"], flux_batch(cfg, pool, step), cfg.edit_loss_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))  # a short warm-up of the EMA
            for e, p in zip(ema.parameters(), student.parameters()):
                e.lerp_(p, 1 - decay)
        seen += loss.item()
        if (step + 1) % cfg.log_every == 0:
            history.append([step + 1, seen / cfg.log_every])
            log(cfg, f"transformer step {step + 1}/{cfg.flux_steps}: loss {seen / cfg.log_every:.4f} "
                     f"grad norm {grad_norm:.2f} lr {opt.param_groups[0]['lr']:.2e} "
                     f"{(time.time() - t0) / (step + 1):.2f} s/step")
            seen = 0.0
        if (step + 1) % cfg.sample_every == 0 or step + 1 == cfg.flux_steps:
            strength = sample_edits(cfg, ema["flux"], ae, with_t5(encoders, ema["t5"]), step + 1)
            log(cfg, f"transformer step {step + 1}: mean edit strength of the EMA model on 8 held-out edits "
                     f"{strength:.2f} (1 = exact)")
        if (step + 1) % cfg.checkpoint_every == 0:
            save_checkpoint(ckpt_path, {"model": student.state_dict(), "ema": ema.state_dict(),
                                        "optimizer": opt.state_dict(), "step": step + 1,
                                        "seconds": time.time() - t0, "history": history})
    save_checkpoint(final, {"ema": ema.state_dict(), "seconds": time.time() - t0, "history": history})
    ckpt_path.unlink(missing_ok=True)
    return ema


def with_t5(encoders: KontextTextEncoders, t5: nn.Module) -> KontextTextEncoders:
    """The same CLIP and tokenizers with another T5 (the one trained with the transformer)."""
    return KontextTextEncoders(encoders.clip, encoders.clip_tokenizer, t5, encoders.t5_tokenizer)


# ---------------------------------------------------------------------------------------------------
# Stage 4: the model folder, its example and its measured accuracy
# ---------------------------------------------------------------------------------------------------

def evaluate_edits(folder: str | Path, n: int = 20, steps: int = 12, seed: int = EVAL_SEED) -> dict:
    """Edit n held-out scenes with one edit and n with two through SliderEditFluxKontextPipeline, and
    measure every edit with the attribute readers.

    An edit is correct when the read attribute lands nearer the target than the source: a colour
    edit's read colour is nearest the target colour in the palette, a size or brightness edit's edit
    strength is over 1/2. Untouched attributes are measured too: their read colour's distance to the
    source colour and the change of their read size."""
    from ..pipelines import SliderEditFluxKontextPipeline

    pipe = SliderEditFluxKontextPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for num_edits in (1, 2):
        for i in range(n):
            example = make_example(seed + num_edits, i, num_edits=num_edits)
            image = pipe(image=render_image(example.source), prompt=example.instruction, num_inference_steps=steps,
                         guidance_scale=models.GUIDANCE, generator=torch.Generator().manual_seed(i)).images[0]
            target = example.target
            for kind in SHAPES:
                reading = read_shape(image, kind, example.source.shape(kind).center)
                for slot in ("color", "size"):
                    edit = next((e for e in example.edits if (e.shape, e.slot) == (kind, slot)), None)
                    want = target.shape(kind)
                    row = {"num_edits": num_edits, "index": i, "shape": kind,
                           "attribute": slot if edit is None else edit.attribute, "edited": edit is not None}
                    row["error"] = (float(np.linalg.norm(np.subtract(reading.color, want.color))) if slot == "color"
                                    else abs(reading.size - want.size))
                    if edit is not None:
                        row["strength"] = edit_strength(image, example.source, edit)
                        row["correct"] = (nearest_color(reading.color) == edit.value if edit.attribute == "color"
                                          else row["strength"] > 0.5)
                    rows.append(row)

    def summary(selected: list[dict]) -> dict:
        out = {"count": len(selected)}
        if selected and "correct" in selected[0]:
            out["accuracy"] = float(np.mean([r["correct"] for r in selected]))
            out["mean_strength"] = float(np.mean([r["strength"] for r in selected]))
        for attributes, unit in ((("color", "brightness"), "rgb_error"), (("size",), "size_error_px")):
            errors = [r["error"] for r in selected if r["attribute"] in attributes]
            if errors:
                out[f"mean_{unit}"] = float(np.mean(errors))
        return out

    edited = [r for r in rows if r["edited"]]
    metrics = {"scenes": 2 * n, "steps": steps, "guidance": models.GUIDANCE, "edited": summary(edited)}
    for attribute in EDIT_ATTRIBUTES:
        metrics[f"edited_{attribute}"] = summary([r for r in edited if r["attribute"] == attribute])
    metrics["edited_one_edit_prompts"] = summary([r for r in edited if r["num_edits"] == 1])
    metrics["edited_two_edit_prompts"] = summary([r for r in edited if r["num_edits"] == 2])
    for attribute in EDIT_ATTRIBUTES:
        metrics[f"two_edit_{attribute}"] = summary([r for r in edited if r["num_edits"] == 2 and r["attribute"] == attribute])
    metrics["untouched"] = summary([r for r in rows if not r["edited"]])
    return metrics


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


def _count(module: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()):,}"


def sliders_section(cfg: RecipeConfig, sliders: dict[str, dict] | None) -> str:
    """Step 4 of the model card: the sliders trained on the base model (once they are)."""
    if not sliders:
        return ""
    edits = ", ".join(f'"{e.instruction}"' for e in INDEPENDENT_EDITS)
    gst, st = sliders["gstlora"], sliders["stlora"]

    def run(r: dict) -> str:
        return "loss not recorded" if r["loss"] is None else f"Final loss {r['loss']:.4f}, {r['minutes']:.1f} min"

    return f"""
4. Sliders (`sliders/`), with train.py's trainer (`slideredit/toy/slider_recipe.py`; each folder holds
   its `train_config.yaml`): {cfg.slider_scenes} held-apart source scenes; rank 16, AdamW lr 1e-3, batch 8,
   {gst['steps']} steps, fp32.
   - `sliders/gstlora/pytorch_lora_weights.safetensors`: GSTLoRA, student = the edit prompt (one or two of
     {edits}), teacher = "keep the image the same". {run(gst)}.
   - `sliders/stlora/selective_lora.safetensors`: STLoRA with PPS over those four single edits (1-2 per
     prompt). {run(st)}.
   The demo's edits (the first two) are continuous: their sliders exaggerate (alpha < 0) as well as
   suppress (alpha > 0). "make the circle blue" is a colour edit: a palette colour has nothing past it,
   so its slider only suppresses. Measured slider behaviour: `benchmarks/RESULTS.md` (toy sliders) and
   `python benchmarks/toy_sliders.py`. Retrain a slider from the repository root:
   `python -m slideredit.toy.slider_data` (writes `data/toy-sliders`), then
   `python train.py --config {cfg.out}/sliders/<gstlora|stlora>/train_config.yaml`.
"""


def recipe_command(cfg: RecipeConfig) -> str:
    """The command that made `cfg`'s model: --out (and --replace-shipped for the shipped model), then every
    field that differs from its default."""
    return "python -m slideredit.toy.recipe --out " + str(cfg.out) + (
        " --replace-shipped" if is_shipped_model(cfg.out) else "") + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in asdict(cfg).items()
        if k not in ("out", "workdir") and v != getattr(RecipeConfig(), k))


def write_model_card(cfg: RecipeConfig, metrics: dict, sliders: dict[str, dict] | None = None) -> None:
    """README.md of the model folder, from the recorded run: sizes, command, times, losses, accuracy,
    and the sliders once they are trained."""
    ae_run, flux_run = load_checkpoint(cfg.workdir / "ae.pt"), load_checkpoint(cfg.workdir / "flux.pt")
    ae_stats = json.loads((cfg.workdir / "autoencoder.json").read_text())
    pool = load_checkpoint(cfg.workdir / "pool.pt")
    encoders = models.build_text_encoders(cfg.seed)
    p = models.FLUX_PARAMS
    command = recipe_command(cfg)
    size_kb = sum(f.stat().st_size for f in cfg.out.rglob("*") if f.is_file()) / 1024
    losses = ", ".join(f"{loss:.3f} (step {step})" for step, loss in flux_run["history"][:: max(1, len(flux_run["history"]) // 6)])

    def row(name: str, m: dict) -> str:
        rgb, px = m.get("mean_rgb_error"), m.get("mean_size_error_px")
        if not m["count"]:
            return f"| {name} | 0 | | | | |"
        return (f"| {name} | {m['count']} | {m['accuracy']:.0%} | {m['mean_strength']:.2f} | "
                f"{'' if rgb is None else f'{rgb:.1f}'} | {'' if px is None else f'{px:.2f}'} |")

    untouched = metrics["untouched"]
    card = f"""# toy-kontext: a FLUX.1 Kontext-shaped editing model for a toy world of shapes

A complete model folder for `SliderEditFluxKontextPipeline.from_pretrained` (the same classes and file
layout as FLUX.1 Kontext [dev], about 1/5000 of its size), trained from scratch on a CPU on synthetic
edits of a {IMAGE_SIZE}x{IMAGE_SIZE} scene: a square in the left half and a circle in the right half, each with a
colour (red, green, blue, yellow, and darker or lighter shades) and a size. It understands only the toy
world's instructions: `make the square|circle red|green|blue|yellow|larger|smaller|darker|lighter`,
joined with " and ", and
`keep the image the same`. Its purpose is to show and test SliderEdit on a CPU; it edits nothing else.

## Files
| file | what | parameters |
|---|---|---|
| `{models.TRANSFORMER_FILE}` | Flux (BFL names): hidden {p.hidden_size}, {p.num_heads} heads, {p.depth} double + {p.depth_single_blocks} single blocks, RoPE axes {p.axes_dim}, T5 width {p.context_in_dim}, CLIP width {p.vec_in_dim} | {_count(flux_like())} |
| `{models.AE_FILE}` | autoencoder (BFL names): ch {models.AE_PARAMS.ch}, ch_mult {models.AE_PARAMS.ch_mult}, {models.AE_PARAMS.num_res_blocks} res block per level, 16 latent channels, 8x down; FLUX's scale/shift | {_count(models.build_autoencoder())} |
| `text_encoder/`, `tokenizer/` | CLIP text model (hidden 32, 1 layer), byte-level BPE spelling the corpus words; random init, frozen | {_count(encoders.clip)} |
| `text_encoder_2/`, `tokenizer_2/` | T5 encoder (d_model {models.T5_CONFIG["d_model"]}, {models.T5_CONFIG["num_layers"]} layers), trained with the transformer; word-level unigram tokenizer of the corpus | {_count(encoders.t5)} |
| `scheduler/`, `slideredit.json` | FLUX's schedule shift; edit defaults: {models.MAX_SEQUENCE_LENGTH} T5 tokens, no resize to Kontext resolutions | |
| `example.png`, `example.json` | a source scene and its default prompts | |

Weights are stored in {cfg.save_dtype}; the folder is {size_kb:.0f} KiB.
An edit sees 64 noisy + 64 context + 32 text tokens.

## How it was made
One command, every stage seeded (seed {cfg.seed}) and resumable; the times below are wall-clock on a
shared 2-core CPU with 1 or 2 threads (`--threads`):

    {command}

1. Autoencoder: {cfg.ae_steps} steps of {cfg.ae_batch} random {cfg.ae_crop}x{cfg.ae_crop} crops of rendered scenes (the last third:
   the same number of pixels as whole images); scenes from the editing world, one in four with any colours
   and a wider range of sizes. Every residual branch starts at zero. L1 + MSE reconstruction (shape pixels
   weighted {cfg.ae_shape_weight:g}x) from a latent with N(0, {cfg.ae_latent_noise}^2) noise added, plus a penalty holding each
   latent channel at zero mean and unit variance. {ae_run['seconds'] / 60:.1f} min. Held-out reconstruction PSNR
   {ae_stats['psnr_db']:.1f} dB, worst pixel error {ae_stats['max_abs_error_8bit']:.0f}/255, latent mean {ae_stats['latent_mean']:.2f}
   and std {ae_stats['latent_std']:.2f}.
2. Training pool: {cfg.pool_sources} source scenes x {cfg.edits_per_source} random instructions of 1-3 edits
   ({len(pool['pair_source'])} pairs, {len(pool['texts'])} distinct prompts), rendered exactly and encoded once.
3. Transformer: {cfg.flux_steps} steps of batch {cfg.flux_batch} with Kontext's rectified-flow objective (target latents
   noised, source latents as context tokens, velocity regression on the noisy tokens), t = sigmoid(N(mu, 1))
   with the pipeline's shift mu, tokens the edit changes weighted {cfg.edit_loss_weight:g}x, guidance input drawn from [1, 5], CLIP's pooled vector taken from a random
   other prompt (edits are read from the T5 tokens only), {cfg.identity_fraction:.0%} identity pairs with
   "keep the image the same" or "". T5 trains with the transformer (from its random initialisation: the
   transformer's text tokens have no positions, so T5 must say which shape each word belongs to).
   AdamW lr {cfg.flux_lr} (warm-up {cfg.flux_warmup}, cosine to a tenth), EMA {cfg.ema_decay}; the EMA weights ship. {flux_run['seconds'] / 60:.1f} min. Loss: {losses}.
{sliders_section(cfg, sliders)}
## Measured edits
Through `SliderEditFluxKontextPipeline` with {metrics['steps']} steps, guidance {metrics['guidance']}, on {metrics['scenes']}
held-out scenes ({metrics['scenes'] // 2} one-edit and {metrics['scenes'] // 2} two-edit prompts), read back with the attribute
readers of `slideredit/toy/shapes.py`. Correct: the read colour's nearest palette colour is the target, or
the read size or brightness is nearer the target than the source. Edit strength: 0 = unchanged, 1 = exact.

| edits | count | correct | mean strength | colour error (RGB distance) | size error (px) |
|---|---|---|---|---|---|
{row("all edited attributes", metrics["edited"])}
{row("colour edits", metrics["edited_color"])}
{row("size edits", metrics["edited_size"])}
{row("brightness edits", metrics["edited_brightness"])}
{row("in one-edit prompts", metrics["edited_one_edit_prompts"])}
{row("in two-edit prompts", metrics["edited_two_edit_prompts"])}
{row("colour, in two-edit prompts", metrics["two_edit_color"])}
{row("size, in two-edit prompts", metrics["two_edit_size"])}
{row("brightness, in two-edit prompts", metrics["two_edit_brightness"])}

Attributes the prompt does not touch ({untouched['count']}): mean colour error {untouched['mean_rgb_error']:.1f}, mean size error
{untouched['mean_size_error_px']:.2f} px.

## Use
```python
import torch
from slideredit.pipelines import SliderEditFluxKontextPipeline
pipe = SliderEditFluxKontextPipeline.from_pretrained("{cfg.out}", torch_dtype=torch.float32)
image = pipe(image="{cfg.out}/example.png", prompt="make the square darker", num_inference_steps={metrics['steps']}).images[0]
```
"""
    (cfg.out / "README.md").write_text(card)


def flux_like() -> Flux:
    with torch.device("meta"):
        return Flux(models.FLUX_PARAMS)


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
    write_model_card(cfg, metrics, sliders)
    log(cfg, f"done: {cfg.out} ({json.dumps(timings)})")
    return metrics


if __name__ == "__main__":
    main()
