"""torch.compile on the toy model (issue 14, item 5): eager vs compiled blocks over a 5 x 5 STLoRA sweep.

Two pipelines on the same toy folder, one eager and one with `pipe.compile()` (inductor). After one
warm-up call the compiled one renders the whole 5 x 5 sweep (both sub-prompt sliders over
[-1, -0.5, 0, 0.5, 1]) under torch.compiler.set_stance("fail_on_recompile"), so any recompilation
aborts the run; dynamo's `unique_graphs` counter is reported too.
- Speed: the transformer forward of every sweep cell (the compiled part: the VAE and text encoders stay
  eager), eager and compiled in interleaved repetitions; per repetition the ratio eager / compiled,
  reported as min / median / max.
- Images: the sweep through the pipeline (2 steps, one call per row of 5 strengths), max |difference|
  of the [0, 1] images, compiled vs eager.

    python benchmarks/bench_compile.py [--model assets/toy-kontext] [--reps 3] [--steps 2]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slideredit.pipelines import SliderEditFluxKontextPipeline  # noqa: E402
from slideredit.sampling import latent_ids, text_ids  # noqa: E402
from slideredit.sliders import STLORA, set_slider_scale  # noqa: E402
from slideredit.toy.shapes import Edit, make_example, render_image  # noqa: E402

ALPHAS = [-1.0, -0.5, 0.0, 0.5, 1.0]
COLOR, SIZE = Edit("square", "red"), Edit("circle", "larger")
PROMPT, SUBPROMPTS = f"{COLOR.instruction} and {SIZE.instruction}", [COLOR.instruction, SIZE.instruction]


def load(model: Path) -> SliderEditFluxKontextPipeline:
    pipe = SliderEditFluxKontextPipeline.from_pretrained(model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_stlora(model / "sliders" / "stlora")
    return pipe


def forward_sweep(pipe, inputs: dict) -> float:
    """Seconds for the transformer forwards of the 25 cells, each with its STLoRA scales."""
    start = time.perf_counter()
    for a in ALPHAS:
        for b in ALPHAS:
            schedule = pipe.slider_schedule([PROMPT], 1, 1, pipe.defaults.max_sequence_length, None, SUBPROMPTS,
                                            [a, b], None)
            set_slider_scale(pipe.transformer, STLORA, schedule.scales(0, 1.0)[1])
            pipe.transformer(**inputs)
    return time.perf_counter() - start


def image_sweep(pipe, image, steps: int) -> torch.Tensor:
    """(25, 3, H, W): row a of the grid is one call with 5 per-image strengths of the second slider."""
    return torch.cat([pipe(image=image, prompt=PROMPT, num_inference_steps=steps, output_type="pt",
                           generator=torch.Generator().manual_seed(0), subprompts_list=SUBPROMPTS,
                           slider_alpha_list=[a, ALPHAS]).images for a in ALPHAS])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "assets" / "toy-kontext")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)

    # dynamic=False: one static graph per batch shape (the warm-ups run batch 5 and batch 1; by default
    # dynamo would turn the second shape into a slower dynamic-shape graph)
    eager, compiled = load(args.model), load(args.model).compile(dynamic=False)
    image = render_image(make_example(50_000, 0, num_edits=0).source)
    txt, vec = eager.encode_prompt(PROMPT)
    side = image.width // 16  # the context's token grid; the target has the same size
    ids = torch.cat([latent_ids(1, side, side, 0), latent_ids(1, side, side, 1)], dim=1)
    inputs = dict(img=torch.randn(1, 2 * side * side, 64, generator=torch.Generator().manual_seed(0)), img_ids=ids,
                  txt=txt, txt_ids=text_ids(1, txt.shape[1]), y=vec, timesteps=torch.full((1,), 0.7),
                  guidance=torch.full((1,), 2.5))

    start = time.perf_counter()
    compiled(image=image, prompt=PROMPT, num_inference_steps=args.steps, output_type="pt",
             subprompts_list=SUBPROMPTS, slider_alpha_list=[0.3, ALPHAS])  # warm-up at batch 5
    forward_sweep(compiled, inputs)  # warm-up at batch 1
    warm = time.perf_counter() - start
    graphs = counters["stats"]["unique_graphs"]

    ratios, times = [], {"eager": [], "compiled": []}
    with torch.compiler.set_stance("fail_on_recompile"):
        for _ in range(args.reps):
            times["eager"].append(forward_sweep(eager, inputs))
            times["compiled"].append(forward_sweep(compiled, inputs))
            ratios.append(times["eager"][-1] / times["compiled"][-1])
        images_compiled = image_sweep(compiled, image, args.steps)
    images_eager = image_sweep(eager, image, args.steps)
    assert counters["stats"]["unique_graphs"] == graphs

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; toy model {eager.transformer.params.hidden_size} wide")
    print(f"warm-up (inductor compile + first calls): {warm:.1f} s; graphs after warm-up: {graphs}; "
          "recompilations during the sweeps: 0 (fail_on_recompile)")
    for name, t in times.items():
        print(f"{name:9s} 25 forwards: min {min(t):.3f} s, median {statistics.median(t):.3f} s, max {max(t):.3f} s")
    print(f"speed-up eager / compiled per repetition: min {min(ratios):.2f}x, median {statistics.median(ratios):.2f}x, "
          f"max {max(ratios):.2f}x over {args.reps} reps")
    diff = (images_compiled - images_eager).abs().max().item()
    print(f"5 x 5 sweep images ({args.steps} steps, [0, 1]): max |compiled - eager| = {diff:.3g}")


if __name__ == "__main__":
    main()
