"""The default demo's grid, read for fidelity: what `python infer.py` draws with no arguments (the toy model's
example scene and prompt, seed 0, the STLoRA sliders over DEMO_ALPHAS x DEMO_ALPHAS), each cell read
against the ideal render of its own read strengths (fidelity.py). The recipe writes the summary into the
model card; benchmarks/toy_sliders.py prints every cell."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .fidelity import read_fidelity
from .models import GUIDANCE
from .shapes import Edit, render_image, scene_from_dict

DEMO_ALPHAS = [-1.0, -0.5, 0.0, 0.5, 1.0]  # infer.py's default sweep: the demo's 5 x 5 grid
DEMO_EDITS = [Edit("square", "darker"), Edit("circle", "larger")]  # the example prompt's two edits, in order
# issue 23's goals for every cell: image error (mean |RGB|) and the worse shape's core-colour error (RGB)
FIDELITY_GOALS = {"image_error": 3.0, "color_error": 12.0}


@torch.no_grad()
def demo_grid_fidelity(pipe, model: str | Path) -> dict:
    """pipe: a SliderEditFluxKontextPipeline of `model` with its STLoRA sliders loaded. All 25 cells in one
    call, as infer.py renders a sweep (the same noise in every cell). -> {"cells": [per cell: alphas,
    strengths, image_error, color_error per shape, position_error, size_error per shape], "image_error" and
    "color_error": {"median", "max"}, "cells_meeting_goals": how many cells meet both FIDELITY_GOALS}."""
    model = Path(model)
    example = json.loads((model / "example.json").read_text())
    scene = scene_from_dict(example["scene"])
    cells = [(a, b) for a in DEMO_ALPHAS for b in DEMO_ALPHAS]
    images = pipe(image=render_image(scene), prompt=example["prompt"], num_inference_steps=example["steps"],
                  guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(0),
                  subprompts_list=example["subprompts"],
                  slider_alpha_list=[[cell[k] for cell in cells] for k in range(2)]).images
    readings = [read_fidelity(image, scene, DEMO_EDITS) for image in images]
    return {"cells": [{"alphas": list(cell), "strengths": [round(s, 3) for s in r.strengths],
                       "image_error": round(r.image_error, 2),
                       "color_error": {kind: round(shape.color_error, 1) for kind, shape in r.shapes.items()},
                       "position_error": round(r.position_error, 2),
                       "size_error": {kind: round(shape.size_error, 2) for kind, shape in r.shapes.items()}}
                      for cell, r in zip(cells, readings)],
            "image_error": {"median": float(np.median([r.image_error for r in readings])),
                            "max": max(r.image_error for r in readings)},
            "color_error": {"median": float(np.median([r.color_error for r in readings])),
                            "max": max(r.color_error for r in readings)},
            "cells_meeting_goals": sum(r.image_error <= FIDELITY_GOALS["image_error"]
                                       and r.color_error <= FIDELITY_GOALS["color_error"] for r in readings)}


def measure_demo_grid(model: str | Path) -> dict:
    """demo_grid_fidelity of a toy model folder and its STLoRA sliders, in float32 (what the recipe records)."""
    from ..pipelines import SliderEditFluxKontextPipeline

    pipe = SliderEditFluxKontextPipeline.from_pretrained(model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_stlora(Path(model) / "sliders" / "stlora")
    return demo_grid_fidelity(pipe, model)
