"""The toy recipe's evaluation (stage 4, recipe.py): edits of held-out scenes through
SliderEditFluxKontextPipeline, each edited and untouched attribute read back from the image."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import models
from .recipe_common import EVAL_SEED
from .shapes import SHAPES, edit_strength, make_example, nearest_color, read_shape, render_image

EDIT_ATTRIBUTES = ("color", "size", "brightness")


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
