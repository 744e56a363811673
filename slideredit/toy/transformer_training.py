"""Stages 2 and 3 of the toy recipe (recipe.py): the training pool (scenes and their edits rendered and
encoded once) and the transformer, trained with T5 on Kontext's rectified-flow objective."""
from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..autoencoder import AutoEncoder
from ..sampling import (KontextInputs, compute_mu, denoise, get_schedule, kontext_velocity, latent_ids, pack_latents,
                        text_ids, unpack_latents)
from ..text_encoders import KontextTextEncoders
from ..transformer import Flux
from . import models
from .recipe_common import (EVAL_SEED, RecipeConfig, image_row, load_checkpoint, log, lr_at, save_checkpoint, to_images,
                            to_pixels)
from .shapes import (IMAGE_SIZE, NEUTRAL_PROMPT, Scene, ToyExample, edit_strength, make_example, random_edits,
                     random_scene, render, render_image)


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


def token_weights(x0: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, edit_weight: float,
                  copy_weight: float = 0.0) -> torch.Tensor:
    """(B, N) loss weight per target token: 1 where the edit leaves the source as it is, `edit_weight`
    where it changes it. An edit touches a few of the 64 tokens (a shape's colour, a ring of size); with
    uniform weights the loss is mostly about copying the rest, and the edits of two-edit prompts came
    out weak.

    The identity term adds `copy_weight * t^2` on the unchanged tokens: t^2 |v_pred - v|^2 is the squared
    error of the clean latent the prediction implies (z - t v_pred), so it asks that untouched tokens come
    out as the source's, most where the noisy token says least about them (high t, the first sampling
    steps, which fix the colours). Without it the base model recoloured shapes no edit named (a green
    circle came out teal under "make the circle larger" and even "keep the image the same")."""
    changed = ((x0 - cond).pow(2).mean(dim=-1) / EDITED_TOKEN_MSE).clamp(max=1.0)
    return 1 + (edit_weight - 1) * changed + copy_weight * t[:, None].pow(2) * (1 - changed)


def flux_loss(model: Flux, t5: torch.nn.Module, batch: dict, edit_weight: float = 1.0,
              copy_weight: float = 0.0) -> torch.Tensor:
    x0, cond, noise, t = batch["x0"], batch["cond"], batch["noise"], batch["t"]
    b, n = x0.shape[:2]
    side = int(math.isqrt(n))
    z = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    ids = torch.cat([latent_ids(b, side, side, 0), latent_ids(b, side, side, 1)], dim=1)
    txt = t5(batch["t5_ids"]).last_hidden_state  # no attention mask, as KontextTextEncoders.encode
    pred = model(img=torch.cat([z, cond], dim=1), img_ids=ids, txt=txt, txt_ids=text_ids(b, txt.shape[1]),
                 timesteps=t, y=batch["pooled"], guidance=batch["guidance"])
    weights = token_weights(x0, cond, t, edit_weight, copy_weight)
    return ((pred[:, :n] - (noise - x0)).pow(2).mean(dim=-1) * weights).sum() / weights.sum()


@torch.no_grad()
def edit_latents(model: Flux, cond: torch.Tensor, txt: torch.Tensor, pooled: torch.Tensor, steps: int,
                 seed: int) -> torch.Tensor:
    """Sample edits directly (as the pipeline does, without the image and text encoding)."""
    b, n = cond.shape[:2]
    side = int(math.isqrt(n))
    noise = torch.randn(cond.shape, generator=torch.Generator().manual_seed(seed))
    inputs = KontextInputs(img=noise, img_ids=latent_ids(b, side, side, 0), txt=txt, txt_ids=text_ids(b, txt.shape[1]),
                           vec=pooled, cond=cond, cond_ids=latent_ids(b, side, side, 1))
    return denoise(kontext_velocity(model, inputs, models.GUIDANCE), noise, get_schedule(steps, n), progress=False)


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
        loss = flux_loss(student["flux"], student["t5"], flux_batch(cfg, pool, step), cfg.edit_loss_weight,
                         cfg.copy_loss_weight)
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
