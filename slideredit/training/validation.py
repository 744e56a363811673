"""Validation grids: the current adapter swept over `validation_lora_scales` on the validation prompts.

One row per prompt, one column per slider value, every cell from the same seed, so the only
difference along a row is the slider. GSTLoRA slides the whole edit; STLoRA slides the prompt's first
" and "-separated instruction while the others are edited normally (what PPS trains it to do).
"""
from __future__ import annotations

import torch
from PIL import Image

from ..grids import labelled_grid
from ..pipelines import SliderEditFluxKontextPipeline
from ..sliders import GSTLORA
from .losses import JOINER


def slider_arguments(method: str, prompt: str, alpha: float) -> dict:
    if method == GSTLORA:
        return {"slider_alpha": alpha}
    return {"subprompts_list": [prompt.split(JOINER)[0]], "slider_alpha_list": [alpha]}


@torch.no_grad()
def validation_grid(pipe: SliderEditFluxKontextPipeline, method: str, image: Image.Image, prompts: list[str],
                    scales: list[float], *, steps: int, guidance: float, seed: int) -> Image.Image:
    """`image` is the square training-resolution source; the edits keep its size."""
    progress, pipe.progress = pipe.progress, False
    rows = []
    try:
        for prompt in prompts:
            embeds, pooled = pipe.encode_prompt(prompt)  # once per row
            rows.append([
                pipe(image=image, prompt=prompt, prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                     num_inference_steps=steps, guidance_scale=guidance, height=image.height, width=image.width,
                     auto_resize=False, generator=torch.Generator("cpu").manual_seed(seed),
                     **slider_arguments(method, prompt, alpha)).images[0]
                for alpha in scales])
    finally:
        pipe.progress = progress
    return labelled_grid(rows, prompts, [f"{a:+.2f}" for a in scales])  # whole prompts: the column fits them
