"""Does the toy base model leave alone what no edit names? Untouched shapes' core colours over noise seeds.

The default demo's circle is teal in every cell of its grid although no edit recolours it. This measures
where that comes from, for several toy model folders side by side. For the demo's scene and held-out
scenes, each prompt below is run with 8 noise seeds (no sliders); for every shape the prompt leaves alone,
its core colour (fidelity.py: the mean colour of the shape's interior) is compared with the source's:

- error: the mean over seeds of |colour - source colour| (Euclidean RGB), what one picture shows;
- bias: |mean colour over the seeds - source colour|, the part every seed shares;
- spread: the mean over seeds of |colour - mean colour over the seeds|, the part the noise decides.

The autoencoder alone (encode, decode the source) is the floor under all three. It is also read with
Gaussian noise of std LATENT_NOISE added to the latents (unit variance per channel): how much an error
that points nowhere in particular moves the decoded colours, against the transformer's.

    python benchmarks/toy_copy_spread.py [--models assets/toy-kontext runs/toy-kontext] [--scenes 16]
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch

from slideredit.pipelines import SliderEditFluxKontextPipeline
from slideredit.toy.fidelity import read_fidelity
from slideredit.toy.models import GUIDANCE
from slideredit.toy.recipe_common import to_images, to_pixels
from slideredit.toy.shapes import NEUTRAL_PROMPT, SHAPES, Scene, make_example, render, render_image, scene_from_dict

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT_SEED = 30_000  # a scene stream no training, evaluation or other benchmark uses
SEEDS = 8
LATENT_NOISE = (0.0, 0.1, 0.2, 0.3)  # 0: the same scenes without noise, to compare with
STEPS = 12  # the demo's
# prompt -> the shapes it leaves alone
PROMPTS = {NEUTRAL_PROMPT: SHAPES, "make the square darker": ("circle",), "make the circle larger": ("square",)}


def core_colors(image, scene: Scene) -> dict[str, np.ndarray]:
    """Mean RGB of each shape's interior: fidelity.py's reading against the unedited scene."""
    return {kind: np.array(shape.color) for kind, shape in read_fidelity(image, scene, []).shapes.items()}


def copy_stats(colors: np.ndarray, source: np.ndarray) -> dict[str, float]:
    """colors: (seeds, 3) of one shape; source: (3,)."""
    mean = colors.mean(axis=0)
    return {"error": float(np.linalg.norm(colors - source, axis=1).mean()),
            "bias": float(np.linalg.norm(mean - source)),
            "spread": float(np.linalg.norm(colors - mean, axis=1).mean())}


@torch.no_grad()
def measure(model: Path, scenes: list[Scene]) -> dict:
    """{"autoencoder": [per scene: error of the worse shape], prompt: [per scene: {shape: copy_stats}]}."""
    pipe = SliderEditFluxKontextPipeline.from_pretrained(model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe.autoencoder.encode(to_pixels([render(s) for s in scenes]))

    def worse_shape_errors(latents: torch.Tensor) -> list[float]:
        images = to_images(pipe.autoencoder.decode(latents))
        return [read_fidelity(image, scene, []).color_error for image, scene in zip(images, scenes)]

    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    noisy = {str(std): worse_shape_errors(latents + std * noise) for std in LATENT_NOISE}
    result = {"autoencoder": noisy["0.0"], "autoencoder_latent_noise": noisy}
    for prompt, untouched in PROMPTS.items():
        result[prompt] = []
        for scene in scenes:
            images = pipe(image=render_image(scene), prompt=[prompt] * SEEDS, num_inference_steps=STEPS,
                          guidance_scale=GUIDANCE,  # seed s: the noise of an unbatched call with seed s
                          generator=[torch.Generator().manual_seed(seed) for seed in range(SEEDS)]).images
            reads = [core_colors(image, scene) for image in images]
            colors = {kind: [read[kind] for read in reads] for kind in untouched}
            result[prompt].append({kind: {**copy_stats(np.array(c), np.asarray(scene.shape(kind).color, float)),
                                          "colors": np.round(c, 1).tolist()} for kind, c in colors.items()})
    return result


def summary_row(name: str, scene_stats: list[dict]) -> str:
    """Mean over scenes (and shapes) of error / bias / spread; the demo scene's circle is reported apart."""
    cells = [np.mean([s[key] for stats in scene_stats for s in stats.values()]) for key in ("error", "bias", "spread")]
    return f"{name}: " + " / ".join(f"{c:.1f}" for c in cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, nargs="+", default=[ROOT / "assets" / "toy-kontext"],
                        help="toy model folders, measured side by side (default: the shipped one)")
    parser.add_argument("--scenes", type=int, default=16, help="held-out scenes besides the demo's (default: 16)")
    parser.add_argument("--out", type=Path, default=None, help="also write every number to this JSON file")
    args = parser.parse_args()
    if args.scenes < 1:
        parser.error(f"--scenes must be at least 1, got {args.scenes}")
    for model in args.models:
        if not (model / "example.json").is_file():
            parser.error(f"--models {model}: not a toy model folder (no example.json)")
    demo = scene_from_dict(json.loads((args.models[0] / "example.json").read_text())["scene"])
    held_out = [make_example(HELD_OUT_SEED, i, num_edits=0).source for i in range(args.scenes)]
    print(f"{platform.processor() or platform.machine()}, float32, {STEPS} steps, {SEEDS} seeds per scene and prompt; "
          f"untouched shapes' core colour vs the source, RGB: error / bias / spread (module docstring)")
    everything = {}
    for model in args.models:
        results = everything[str(model)] = measure(model, [demo, *held_out])
        print(f"\n{model}\n- autoencoder alone (worse shape): demo scene {results['autoencoder'][0]:.1f}, "
              f"{args.scenes} scenes mean {np.mean(results['autoencoder'][1:]):.1f}; with latent noise of std "
              + ", ".join(f"{std}: {np.mean(errors):.1f}" for std, errors in results["autoencoder_latent_noise"].items())
              + " (all scenes)")
        for prompt in PROMPTS:
            demo_circle = results[prompt][0].get("circle")
            circle = (f"; demo circle {demo_circle['error']:.1f} / {demo_circle['bias']:.1f} / "
                      f"{demo_circle['spread']:.1f}" if demo_circle else "")
            print("- " + summary_row(f"'{prompt}', {args.scenes} scenes", results[prompt][1:]) + circle)
        circle = results[NEUTRAL_PROMPT][0]["circle"]["colors"]
        print(f"- the demo circle {demo.circle.color} under '{NEUTRAL_PROMPT}', seed by seed: "
              + " ".join(str(tuple(round(v) for v in c)) for c in circle))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
