"""fp8 on the toy model (issue 13, item 5b): edit accuracy and slider curves, fp8 weights vs the model's dtype.

The same held-out scenes, prompts, seeds and sliders through SliderEditFluxKontextPipeline loaded as
float32 (the toy folder's dtype, what benchmarks/toy_sliders.py and the model card use) and with
quantize="fp8" (block linears in float8_e4m3fn with per-row scales, float32 activations); optionally
bfloat16 too (`--variants float32 bfloat16 fp8`: slow on CPUs without bf16 convolutions).
- Edit accuracy: 20 one-edit and 20 two-edit held-out examples (the model card's stream and rule,
  slideredit/toy/edit_evaluation.py `evaluate_edits`): a colour edit is correct when the read colour's nearest
  palette colour is the target, a size or brightness edit when its edit strength is over 1/2. Also: how many edits
  change verdict against float32, and the mean |strength difference| per edit.
- Slider curves: benchmarks/toy_sliders.py's sweeps on the demo prompt "make the square darker and make
  the circle larger" (GSTLoRA: both edits; STLoRA: each slider's own edit) on its held-out scenes; per
  alpha, the mean edit strength; the largest difference to float32.
Goals: accuracy within 1 point, every curve within 0.05 at every alpha.

    python benchmarks/toy_fp8.py [--model assets/toy-kontext] [--examples 20] [--scenes 8] [--steps 12]
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from slideredit.pipelines import SliderEditFluxKontextPipeline  # noqa: E402
from slideredit.toy.models import GUIDANCE  # noqa: E402
from slideredit.toy.recipe_common import EVAL_SEED  # noqa: E402
from slideredit.toy.shapes import edit_strength, make_example, nearest_color, read_shape, render_image  # noqa: E402
from toy_sliders import ALPHAS, DARKER, LARGER, scenes, sweep  # noqa: E402

VARIANTS = {"float32": {"torch_dtype": torch.float32}, "bfloat16": {"torch_dtype": torch.bfloat16},
            "fp8": {"torch_dtype": torch.float32, "quantize": "fp8"}}


def edit_verdicts(pipe, n: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (correct, strength) per edited attribute of n one-edit and n two-edit held-out examples."""
    correct, strength = [], []
    for num_edits in (1, 2):
        for i in range(n):
            example = make_example(EVAL_SEED + num_edits, i, num_edits=num_edits)
            image = pipe(image=render_image(example.source), prompt=example.instruction, num_inference_steps=steps,
                         guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(i)).images[0]
            for edit in example.edits:
                s = edit_strength(image, example.source, edit)
                if edit.attribute == "color":
                    reading = read_shape(image, edit.shape, example.source.shape(edit.shape).center)
                    correct.append(nearest_color(reading.color) == edit.value)
                else:
                    correct.append(s > 0.5)
                strength.append(s)
    return np.array(correct), np.array(strength)


def slider_curves(pipe, model: Path, n: int, steps: int) -> dict[str, np.ndarray]:
    """The mean edit strength per alpha of toy_sliders.py's sweeps on the demo prompt."""
    sources, edits = scenes(n), [DARKER, LARGER]
    prompt, subprompts = f"{DARKER.instruction} and {LARGER.instruction}", [DARKER.instruction, LARGER.instruction]
    zeros = [0.0] * len(ALPHAS)
    pipe.load_gstlora(model / "sliders" / "gstlora")
    gst = sweep(pipe, sources, steps, prompt, edits, lambda a: {"slider_alpha": a})
    pipe.unload_sliders()
    pipe.load_stlora(model / "sliders" / "stlora")
    first = sweep(pipe, sources, steps, prompt, edits,
                  lambda a: {"subprompts_list": subprompts, "slider_alpha_list": [a, zeros]})
    second = sweep(pipe, sources, steps, prompt, edits,
                   lambda a: {"subprompts_list": subprompts, "slider_alpha_list": [zeros, a]})
    pipe.unload_sliders()
    return {"GSTLoRA darker": gst[:, :, 0].mean(0), "GSTLoRA larger": gst[:, :, 1].mean(0),
            "STLoRA darker (slider 1)": first[:, :, 0].mean(0), "STLoRA larger (slider 2)": second[:, :, 1].mean(0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "assets" / "toy-kontext"), help="the toy model folder")
    parser.add_argument("--examples", type=int, default=20, help="held-out examples per edit count (default: %(default)s)")
    parser.add_argument("--scenes", type=int, default=8, help="held-out scenes per slider sweep (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=12, help="denoising steps (default: %(default)s)")
    parser.add_argument("--variants", nargs="+", default=["float32", "fp8"], choices=list(VARIANTS),
                        help="float32 always runs first, as the reference (default: %(default)s)")
    args = parser.parse_args()
    args.variants = ["float32"] + [v for v in dict.fromkeys(args.variants) if v != "float32"]
    model = Path(args.model)

    results = {}
    for name in args.variants:
        t0 = time.perf_counter()
        pipe = SliderEditFluxKontextPipeline.from_pretrained(model, **VARIANTS[name])
        pipe.set_progress_bar_config(disable=True)
        correct, strength = edit_verdicts(pipe, args.examples, args.steps)
        results[name] = {"correct": correct, "strength": strength,
                         "curves": slider_curves(pipe, model, args.scenes, args.steps),
                         "seconds": time.perf_counter() - t0}
        print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    ref = results["float32"]
    print(f"{platform.machine()} CPU, torch {torch.__version__}; {args.steps} steps; edits: {2 * args.examples} "
          f"held-out examples ({len(ref['correct'])} edited attributes); sliders: {args.scenes} held-out scenes, "
          f"alpha {ALPHAS[0]:g}..{ALPHAS[-1]:g} in {len(ALPHAS)} values\n")
    print("| weights | edit accuracy | vs float32 (points) | verdicts changed | mean abs strength diff |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['correct'].mean():.1%} | {100 * (r['correct'].mean() - ref['correct'].mean()):+.1f} | "
              f"{int((r['correct'] != ref['correct']).sum())} / {len(r['correct'])} | "
              f"{np.abs(r['strength'] - ref['strength']).mean():.4f} |")
    print("\nSlider curves, mean edit strength per alpha; max |diff| to float32 over the alphas:\n")
    print("| curve | weights | " + " | ".join(f"{a:g}" for a in ALPHAS) + " | max abs diff |")
    print("|---|---|" + "---|" * (len(ALPHAS) + 1))
    for curve, values in ref["curves"].items():
        for name, r in results.items():
            got = r["curves"][curve]
            diff = "" if name == "float32" else f"{np.abs(got - values).max():.4f}"
            print(f"| {curve} | {name} | " + " | ".join(f"{v:.3f}" for v in got) + f" | {diff} |")


if __name__ == "__main__":
    main()
