"""How the trained toy sliders behave, measured with the toy world's analytic attribute readers.

For held-out source scenes (never seen in training) and alpha over [-1, 1], on the demo's prompt
"make the square darker and make the circle larger" (two continuous edits):
- GSTLoRA (one slider over the whole prompt): each edit's strength (0 = the source's attribute, 1 = the
  base edit's target, > 1 exaggerated) as a function of alpha.
- STLoRA, one slider per sub-instruction: each slider's own edit strength as it moves with the other
  slider at 0, and how much the OTHER edit's strength moves meanwhile (disentanglement: 0 is perfect).
- GSTLoRA on "make the circle blue": the colour edit, a suppression-only slider (a palette colour has
  no "bluer than blue"), so only alpha 0 .. 1 is measured against the goals.
Per curve: Spearman monotonicity of the mean strength against alpha (-1 = falls steadily as alpha
grows), the strengths at -1 (exaggeration), 0 (base edit) and 1 (suppression), the release's
continuity score (lower is smoother), the half-way alpha (where the mean strength crosses half-way
between its values at the ends of the sweep: at the middle of the sweep when the change is spread
evenly), and the other edit's drift. Each goal of the toy sliders' issue is checked and printed.

    python benchmarks/toy_sliders.py [--model assets/toy-kontext] [--scenes 16] [--out outputs/toy-sliders]
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
from slideredit.toy.models import GUIDANCE
from slideredit.toy.shapes import Edit, Scene, edit_strength, make_example, render_image

ROOT = Path(__file__).resolve().parents[1]
ALPHAS = [-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0]
DARKER, LARGER, BLUE = Edit("square", "darker"), Edit("circle", "larger"), Edit("circle", "blue")
HELD_OUT_SEED = 20_000  # a scene stream used by neither training nor the base model's evaluation
# The goals, per curve: Spearman, |strength| at alpha 1, strength at alpha -1 (continuous edits),
# continuity, drift of the other edit.
GOALS = {"monotonicity": -0.95, "suppressed": 0.05, "exaggerated": 1.3, "continuity": 1.0, "drift": 0.1}


def scenes(n: int) -> list[Scene]:
    """Source scenes on which every measured edit changes the picture clearly (the circle not blue)."""
    out, index = [], 0
    while len(out) < n:
        source = make_example(HELD_OUT_SEED, index, num_edits=0).source
        index += 1
        if np.linalg.norm(np.subtract(source.circle.color, BLUE.apply(source).circle.color)) > 60:
            out.append(source)
    return out


def sweep(pipe, sources: list[Scene], steps: int, prompt: str, edits: list[Edit], sliders_for) -> np.ndarray:
    """-> (scenes, alphas, edits) edit strengths; every alpha of a scene in one batched call (the same
    noise for every alpha, as infer.py's sweeps)."""
    out = np.zeros((len(sources), len(ALPHAS), len(edits)))
    embeds, pooled = pipe.encode_prompt(prompt)
    for i, source in enumerate(sources):
        images = pipe(image=render_image(source), prompt=prompt, prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                      num_inference_steps=steps, guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(i),
                      **sliders_for(ALPHAS)).images
        for j, image in enumerate(images):
            out[i, j] = [edit_strength(image, source, edit) for edit in edits]
    return out


def halfway_alpha(mean: np.ndarray) -> float:
    """The alpha where the mean strength first falls past half-way between its first and last values
    (linear interpolation between grid points)."""
    half = (mean[0] + mean[-1]) / 2
    for k in range(len(mean) - 1):
        if (mean[k] - half) * (mean[k + 1] - half) <= 0 and mean[k] != mean[k + 1]:
            return float(ALPHAS[k] + (ALPHAS[k + 1] - ALPHAS[k]) * (mean[k] - half) / (mean[k] - mean[k + 1]))
    return float("nan")


def curve_stats(strengths: np.ndarray, other: np.ndarray | None = None, continuous: bool = True) -> dict:
    """strengths (scenes, alphas) of the slider's own edit; other: the other edit's strengths. A
    suppression-only slider (continuous=False) is scored on alpha >= 0."""
    zero = ALPHAS.index(0.0)
    mean = strengths.mean(axis=0)
    scored = slice(0, None) if continuous else slice(zero, None)
    alphas, scored_mean = ALPHAS[scored], mean[scored]
    stats = {"mean_strength": mean.round(3).tolist(), "scored_alphas": alphas,
             "monotonicity": monotonicity_score(alphas, scored_mean.tolist()),
             "per_scene_monotonicity": float(np.mean([monotonicity_score(alphas, s[scored].tolist()) for s in strengths])),
             "continuity": continuity_score(scored_mean.tolist()),
             "halfway_alpha": halfway_alpha(scored_mean),
             "at_minus_1": float(mean[0]), "at_0": float(mean[zero]), "at_1": float(mean[-1])}
    if other is not None:
        stats["other_edit_drift"] = float(np.abs(other - other[:, zero:zero + 1]).max(axis=1).mean())
        stats["other_edit_mean_strength"] = other.mean(axis=0).round(3).tolist()
    goals = {"monotonicity": stats["monotonicity"] <= GOALS["monotonicity"],
             "suppressed": abs(stats["at_1"]) <= GOALS["suppressed"],
             "continuity": stats["continuity"] <= GOALS["continuity"]}
    if continuous:
        goals["exaggerated"] = stats["at_minus_1"] >= GOALS["exaggerated"]
    if other is not None:
        goals["drift"] = stats["other_edit_drift"] <= GOALS["drift"]
    stats["goals_met"] = goals
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "assets" / "toy-kontext"), help="the toy model folder")
    parser.add_argument("--scenes", type=int, default=16, help="held-out source scenes (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=12, help="denoising steps (default: %(default)s)")
    parser.add_argument("--out", default="outputs/toy-sliders", help="folder for results.json and curves.png")
    args = parser.parse_args()
    torch.manual_seed(0)

    model = Path(args.model)
    pipe = SliderEditFluxKontextPipeline.from_pretrained(model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    sources = scenes(args.scenes)
    prompt, subprompts = f"{DARKER.instruction} and {LARGER.instruction}", [DARKER.instruction, LARGER.instruction]
    results = {}

    pipe.load_gstlora(model / "sliders" / "gstlora")
    gst = sweep(pipe, sources, args.steps, prompt, [DARKER, LARGER], lambda a: {"slider_alpha": a})
    results[f"GSTLoRA on the demo prompt: {DARKER.instruction}"] = curve_stats(gst[:, :, 0])
    results[f"GSTLoRA on the demo prompt: {LARGER.instruction}"] = curve_stats(gst[:, :, 1])
    blue = sweep(pipe, sources, args.steps, BLUE.instruction, [BLUE], lambda a: {"slider_alpha": a})
    results[f"GSTLoRA: {BLUE.instruction} (colour, suppression only)"] = curve_stats(blue[:, :, 0], continuous=False)
    pipe.unload_sliders()

    pipe.load_stlora(model / "sliders" / "stlora")
    zeros = [0.0] * len(ALPHAS)
    first = sweep(pipe, sources, args.steps, prompt, [DARKER, LARGER],
                  lambda a: {"subprompts_list": subprompts, "slider_alpha_list": [a, zeros]})
    second = sweep(pipe, sources, args.steps, prompt, [DARKER, LARGER],
                   lambda a: {"subprompts_list": subprompts, "slider_alpha_list": [zeros, a]})
    results[f"STLoRA slider 1: {DARKER.instruction}"] = curve_stats(first[:, :, 0], other=first[:, :, 1])
    results[f"STLoRA slider 2: {LARGER.instruction}"] = curve_stats(second[:, :, 1], other=second[:, :, 0])
    pipe.unload_sliders()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"machine": f"{platform.machine()} CPU", "alphas": ALPHAS, "scenes": args.scenes, "steps": args.steps,
              "goals": GOALS, "curves": results}
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    panels = {"edit strength (0 = source, 1 = base edit)":
              {name: (ALPHAS, stats["mean_strength"]) for name, stats in results.items()}}
    save_png(draw_curves(panels), out / "curves.png")

    print(f"{args.scenes} held-out scenes, {args.steps} steps, alphas {ALPHAS[0]}..{ALPHAS[-1]} "
          f"in {len(ALPHAS)} values; mean edit strength per alpha. Goals: Spearman <= {GOALS['monotonicity']}, "
          f"|strength at 1| <= {GOALS['suppressed']}, strength at -1 >= {GOALS['exaggerated']} (continuous edits), "
          f"continuity <= {GOALS['continuity']}, other edit's drift <= {GOALS['drift']}")
    print("| slider | strength at -1 / 0 / 1 | monotonicity | per-scene monotonicity | continuity | half-way alpha | "
          "other edit's drift | goals missed |")
    print("|---|---|---|---|---|---|---|---|")
    for name, s in results.items():
        drift = f"{s['other_edit_drift']:.3f}" if "other_edit_drift" in s else "n/a"
        missed = ", ".join(goal for goal, met in s["goals_met"].items() if not met) or "none"
        print(f"| {name} | {s['at_minus_1']:.2f} / {s['at_0']:.2f} / {s['at_1']:.2f} | {s['monotonicity']:.3f} | "
              f"{s['per_scene_monotonicity']:.3f} | {s['continuity']:.3f} | {s['halfway_alpha']:+.2f} | {drift} | "
              f"{missed} |")
    print("\nMean strength over alpha = " + ", ".join(f"{a:g}" for a in ALPHAS) + ":")
    for name, s in results.items():
        print(f"- {name}: " + " ".join(f"{v:.3f}" for v in s["mean_strength"]))
    print(f"wrote {out / 'results.json'} and {out / 'curves.png'}")


if __name__ == "__main__":
    main()
