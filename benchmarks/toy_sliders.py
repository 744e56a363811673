"""How the trained toy sliders behave, measured with the toy world's analytic attribute readers.

For held-out source scenes (never seen in training) and alpha over [-1, 1]:
- GSTLoRA on "make the square red": the edit strength (0 = the source's colour, 1 = the target's,
  > 1 exaggerated) as a function of alpha.
- STLoRA on "make the square red and make the circle larger", one slider per sub-instruction: each
  slider's own edit strength as it moves with the other slider at 0, and how much the OTHER edit's
  strength moves meanwhile (disentanglement: 0 is perfect).
Per curve: the release's continuity score (lower is smoother), Spearman monotonicity of the mean
strength against alpha (-1 = the slider suppresses more and more as alpha grows, as it should),
and the range of the mean strength. Prints a markdown table; writes JSON and a curves PNG.

    python benchmarks/toy_sliders.py [--model assets/toy-kontext] [--scenes 8] [--out outputs/toy-sliders]
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch

from slideredit.evaluation import continuity_score, draw_curves, monotonicity_score
from slideredit.grids import save_png
from slideredit.pipelines import SliderEditFluxKontextPipeline
from slideredit.toy.shapes import Edit, edit_strength, make_example, render_image

ROOT = Path(__file__).resolve().parents[1]
ALPHAS = [-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0]
COLOR, SIZE = Edit("square", "red"), Edit("circle", "larger")
HELD_OUT_SEED = 20_000  # a scene stream used by neither training nor the base model's evaluation


def scenes(n: int) -> list:
    """Source scenes on which both edits change something (the square not red already)."""
    out, index = [], 0
    while len(out) < n:
        source = make_example(HELD_OUT_SEED, index, num_edits=0).source
        index += 1
        if np.linalg.norm(np.subtract(source.square.color, COLOR.apply(source).square.color)) > 40:
            out.append(source)
    return out


def sweep(pipe, sources, steps: int, prompt: str, sliders_for) -> np.ndarray:
    """-> (scenes, alphas, 2) edit strengths of (COLOR, SIZE) for each alpha's sliders."""
    out = np.zeros((len(sources), len(ALPHAS), 2))
    embeds, pooled = pipe.encode_prompt(prompt)
    for i, source in enumerate(sources):
        for j, alpha in enumerate(ALPHAS):
            image = pipe(image=render_image(source), prompt=prompt, prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                         num_inference_steps=steps, generator=torch.Generator().manual_seed(i),
                         **sliders_for(alpha)).images[0]
            out[i, j] = edit_strength(image, source, COLOR), edit_strength(image, source, SIZE)
    return out


def curve_stats(strengths: np.ndarray, other: np.ndarray | None = None) -> dict:
    """strengths (scenes, alphas) of the slider's own edit; other: the other edit's strengths."""
    mean = strengths.mean(axis=0)
    stats = {"mean_strength": mean.round(3).tolist(),
             "monotonicity": monotonicity_score(ALPHAS, mean.tolist()),
             "per_scene_monotonicity": float(np.mean([monotonicity_score(ALPHAS, s.tolist()) for s in strengths])),
             "continuity": continuity_score(mean.tolist()),
             "range": float(mean.max() - mean.min())}
    if other is not None:
        zero = ALPHAS.index(0.0)
        stats["other_edit_drift"] = float(np.abs(other - other[:, zero:zero + 1]).max(axis=1).mean())
        stats["other_edit_mean_strength"] = other.mean(axis=0).round(3).tolist()
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "assets" / "toy-kontext"), help="the toy model folder")
    parser.add_argument("--scenes", type=int, default=8, help="held-out source scenes (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=12, help="denoising steps (default: %(default)s)")
    parser.add_argument("--out", default="outputs/toy-sliders", help="folder for results.json and curves.png")
    args = parser.parse_args()
    torch.manual_seed(0)

    model = Path(args.model)
    pipe = SliderEditFluxKontextPipeline.from_pretrained(model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    sources = scenes(args.scenes)
    results = {}

    pipe.load_gstlora(model / "sliders" / "gstlora")
    gst = sweep(pipe, sources, args.steps, COLOR.instruction, lambda a: {"slider_alpha": a})
    results["GSTLoRA: make the square red"] = curve_stats(gst[:, :, 0])
    pipe.unload_sliders()

    pipe.load_stlora(model / "sliders" / "stlora")
    prompt = f"{COLOR.instruction} and {SIZE.instruction}"
    subprompts = [COLOR.instruction, SIZE.instruction]
    first = sweep(pipe, sources, args.steps, prompt,
                  lambda a: {"subprompts_list": subprompts, "slider_alpha_list": [a, 0.0]})
    second = sweep(pipe, sources, args.steps, prompt,
                   lambda a: {"subprompts_list": subprompts, "slider_alpha_list": [0.0, a]})
    results["STLoRA slider 1: make the square red"] = curve_stats(first[:, :, 0], other=first[:, :, 1])
    results["STLoRA slider 2: make the circle larger"] = curve_stats(second[:, :, 1], other=second[:, :, 0])
    pipe.unload_sliders()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"machine": f"{platform.machine()} CPU", "alphas": ALPHAS, "scenes": args.scenes, "steps": args.steps,
              "curves": results}
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    panels = {"edit strength (0 = source, 1 = base edit)":
              {name: (ALPHAS, stats["mean_strength"]) for name, stats in results.items()}}
    save_png(draw_curves(panels), out / "curves.png")

    print(f"{args.scenes} held-out scenes, {args.steps} steps, alphas {ALPHAS[0]}..{ALPHAS[-1]} "
          f"in {len(ALPHAS)} values; mean edit strength per alpha")
    print("| slider | strength at -1 / 0 / 1 | monotonicity | per-scene monotonicity | continuity | range | "
          "other edit's drift |")
    print("|---|---|---|---|---|---|---|")
    for name, s in results.items():
        m = s["mean_strength"]
        drift = f"{s['other_edit_drift']:.3f}" if "other_edit_drift" in s else "n/a"
        print(f"| {name} | {m[0]:.2f} / {m[ALPHAS.index(0.0)]:.2f} / {m[-1]:.2f} | {s['monotonicity']:.3f} | "
              f"{s['per_scene_monotonicity']:.3f} | {s['continuity']:.3f} | {s['range']:.3f} | {drift} |")
    print(f"wrote {out / 'results.json'} and {out / 'curves.png'}")


if __name__ == "__main__":
    main()
