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

Fidelity (slideredit/toy/fidelity.py): every image against the ideal render of the strengths read from it
(all the prompt's edits). Per cell: the image error (mean |RGB|, 0..255) and the core-colour error of the
worse shape (RGB distance over the shape's interior), as the mean over the scenes per alpha, the worst
scene per alpha, and per scene its worst alpha; then the demo's own scene (assets/toy-kontext/example.json)
over the default demo's 5 x 5 STLoRA grid (what `python infer.py` draws), cell by cell.

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
from slideredit.toy.demo_grid import DEMO_ALPHAS, FIDELITY_GOALS, demo_grid_fidelity
from slideredit.toy.fidelity import FidelityReading, read_fidelity
from slideredit.toy.models import GUIDANCE
from slideredit.toy.shapes import Edit, Scene, make_example, render_image

ROOT = Path(__file__).resolve().parents[1]
ALPHAS = [-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0]
DARKER, LARGER, BLUE = Edit("square", "darker"), Edit("circle", "larger"), Edit("circle", "blue")
HELD_OUT_SEED = 20_000  # a scene stream used by neither training nor the base model's evaluation
# The issues' goals, per curve: Spearman, |strength| at alpha 1, strength at alpha -1 (continuous edits),
# continuity, drift of the other edit; fidelity in every cell (the scenes' mean): image error, core colour.
GOALS = {"monotonicity": -0.95, "suppressed": 0.05, "exaggerated": 1.3, "continuity": 1.0, "drift": 0.1,
         **FIDELITY_GOALS}


def scenes(n: int) -> list[Scene]:
    """Source scenes on which every measured edit changes the picture clearly (the circle not blue)."""
    out, index = [], 0
    while len(out) < n:
        source = make_example(HELD_OUT_SEED, index, num_edits=0).source
        index += 1
        if np.linalg.norm(np.subtract(source.circle.color, BLUE.apply(source).circle.color)) > 60:
            out.append(source)
    return out


def sweep(pipe, sources: list[Scene], steps: int, prompt: str, edits: list[Edit], sliders_for,
          alphas: list = ALPHAS, seeds: list[int] | None = None) -> list[list[FidelityReading]]:
    """-> [scene][alpha] fidelity readings (their `strengths`: the edits' strengths); every alpha (or cell of
    a grid: sliders_for turns `alphas` into the pipeline's slider arguments) of a scene in one batched call
    (the same noise for every alpha, as infer.py's sweeps). Scene i's seed is i, or seeds[i]."""
    out = []
    embeds, pooled = pipe.encode_prompt(prompt)
    for i, source in enumerate(sources):
        seed = i if seeds is None else seeds[i]
        images = pipe(image=render_image(source), prompt=prompt, prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                      num_inference_steps=steps, guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(seed),
                      **sliders_for(alphas)).images
        out.append([read_fidelity(image, source, edits) for image in images])
    return out


def strengths_of(readings: list[list[FidelityReading]]) -> np.ndarray:
    """(scenes, alphas, edits) edit strengths."""
    return np.array([[reading.strengths for reading in row] for row in readings])


def fidelity_stats(readings: list[list[FidelityReading]]) -> dict:
    """Image error and the worse shape's core-colour error per alpha (mean and worst over the scenes) and
    per scene (its worst alpha)."""
    stats = {}
    for name in ("image_error", "color_error"):
        values = np.array([[getattr(reading, name) for reading in row] for row in readings])  # (scenes, alphas)
        stats[name] = {"mean": values.mean(axis=0).round(2).tolist(),
                       "worst_scene": values.max(axis=0).round(2).tolist(),
                       "per_scene_worst_alpha": values.max(axis=1).round(2).tolist()}
    return stats


def halfway_alpha(mean: np.ndarray) -> float:
    """The alpha where the mean strength first falls past half-way between its first and last values
    (linear interpolation between grid points)."""
    half = (mean[0] + mean[-1]) / 2
    for k in range(len(mean) - 1):
        if (mean[k] - half) * (mean[k + 1] - half) <= 0 and mean[k] != mean[k + 1]:
            return float(ALPHAS[k] + (ALPHAS[k + 1] - ALPHAS[k]) * (mean[k] - half) / (mean[k] - mean[k + 1]))
    return float("nan")


def curve_stats(readings: list[list[FidelityReading]], own: int, other_edit: int | None = None,
                continuous: bool = True) -> dict:
    """readings of a sweep; own: the index of the slider's own edit in their strengths, other_edit: of the
    other edit. A suppression-only slider (continuous=False) is scored on alpha >= 0 (fidelity on every alpha)."""
    all_strengths = strengths_of(readings)
    strengths = all_strengths[:, :, own]
    other = None if other_edit is None else all_strengths[:, :, other_edit]
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
    stats["fidelity"] = fidelity_stats(readings)
    for name in ("image_error", "color_error"):
        goals[name] = max(stats["fidelity"][name]["mean"]) <= GOALS[name]
    stats["goals_met"] = goals
    return stats


def print_fidelity(results: dict, demo: dict, scenes: int) -> None:
    print(f"\nFidelity, {scenes}-scene mean per alpha (worst scene in brackets): image error (mean |RGB|) and the "
          f"worse shape's core-colour error (RGB distance). Goals: <= {GOALS['image_error']} and "
          f"<= {GOALS['color_error']} in every cell.")
    print("| slider | image error at " + " / ".join(f"{a:g}" for a in ALPHAS) + " | core colour at the same alphas |")
    print("|---|---|---|")
    for name, s in results.items():
        cells = {key: " / ".join(f"{m:.1f} ({w:.0f})" if key == "color_error" else f"{m:.1f} ({w:.1f})"
                                 for m, w in zip(s["fidelity"][key]["mean"], s["fidelity"][key]["worst_scene"]))
                 for key in ("image_error", "color_error")}
        print(f"| {name} | {cells['image_error']} | {cells['color_error']} |")
    print("\nPer scene, its worst alpha (image error / core colour):")
    for name, s in results.items():
        pairs = zip(s["fidelity"]["image_error"]["per_scene_worst_alpha"],
                    s["fidelity"]["color_error"]["per_scene_worst_alpha"])
        print(f"- {name}: " + " ".join(f"{i:.1f}/{c:.0f}" for i, c in pairs))
    print(f"\nThe demo's own scene, its 5 x 5 STLoRA grid (rows: darker alpha, columns: larger alpha); per cell "
          f"image error / square core colour / circle core colour. Image error median "
          f"{demo['image_error']['median']:.1f}, max {demo['image_error']['max']:.1f}; worse shape's core colour "
          f"median {demo['color_error']['median']:.0f}, max {demo['color_error']['max']:.0f}.")
    print("| darker \\ larger | " + " | ".join(f"{a:+g}" for a in DEMO_ALPHAS) + " |")
    print("|---" * (len(DEMO_ALPHAS) + 1) + "|")
    for row in range(len(DEMO_ALPHAS)):
        cells = demo["cells"][row * len(DEMO_ALPHAS):(row + 1) * len(DEMO_ALPHAS)]
        print(f"| {DEMO_ALPHAS[row]:+g} | " + " | ".join(
            f"{c['image_error']:.1f} / {c['color_error']['square']:.0f} / {c['color_error']['circle']:.0f}"
            for c in cells) + " |")


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
    results[f"GSTLoRA on the demo prompt: {DARKER.instruction}"] = curve_stats(gst, own=0)
    results[f"GSTLoRA on the demo prompt: {LARGER.instruction}"] = curve_stats(gst, own=1)
    blue = sweep(pipe, sources, args.steps, BLUE.instruction, [BLUE], lambda a: {"slider_alpha": a})
    results[f"GSTLoRA: {BLUE.instruction} (colour, suppression only)"] = curve_stats(blue, own=0, continuous=False)
    pipe.unload_sliders()

    pipe.load_stlora(model / "sliders" / "stlora")
    zeros = [0.0] * len(ALPHAS)
    first = sweep(pipe, sources, args.steps, prompt, [DARKER, LARGER],
                  lambda a: {"subprompts_list": subprompts, "slider_alpha_list": [a, zeros]})
    second = sweep(pipe, sources, args.steps, prompt, [DARKER, LARGER],
                   lambda a: {"subprompts_list": subprompts, "slider_alpha_list": [zeros, a]})
    results[f"STLoRA slider 1: {DARKER.instruction}"] = curve_stats(first, own=0, other_edit=1)
    results[f"STLoRA slider 2: {LARGER.instruction}"] = curve_stats(second, own=1, other_edit=0)
    demo = demo_grid_fidelity(pipe, model)
    pipe.unload_sliders()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"machine": f"{platform.machine()} CPU", "alphas": ALPHAS, "scenes": args.scenes, "steps": args.steps,
              "goals": GOALS, "curves": results, "demo_grid": demo}
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
    print_fidelity(results, demo, args.scenes)
    print(f"wrote {out / 'results.json'} and {out / 'curves.png'}")


if __name__ == "__main__":
    main()
