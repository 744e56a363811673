"""Edit an image with FLUX.1 Kontext [dev], optionally sweeping SliderEdit sliders.

With no arguments: the embedded demo. The toy Kontext model bundled in assets/toy-kontext (trained on a
CPU, see its README) edits its example scene, sweeping its two STLoRA sliders over a grid:
    python infer.py

One edit with the real model:
    python infer.py --model black-forest-labs/FLUX.1-Kontext-dev --image photo.png --prompt "make the sky pink" \\
        --out edited.png

GSTLoRA sweep (one global slider; writes a labelled grid PNG, a GIF and sweep.json into --out):
    python infer.py --model black-forest-labs/FLUX.1-Kontext-dev --image photo.png --prompt "make the sky pink" \\
        --gstlora ckpt/ --alphas -1,-0.5,0,0.5,1

STLoRA sweep (one slider per sub-prompt; with two sub-prompts the grid covers both sliders):
    python infer.py --model black-forest-labs/FLUX.1-Kontext-dev --image face.png --stlora selective_lora.pt \\
        --subprompts "add a hat" "make the hair red" --alphas -1,0,1

Alpha 0 is the base edit, 1 suppresses the instruction, negative values exaggerate it. Every cell of a
sweep uses the same seed, and the prompt is encoded once per sweep.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

from slideredit.cli import join_alphas, parse_alphas
from slideredit.evaluation.sweep import Sweep, SweepCell, write_sweep
from slideredit.grids import labelled_grid, save_gif, save_png, with_caption
from slideredit.image import load_image, to_rgb
from slideredit.pipelines import SliderEditFluxKontextPipeline

TOY_MODEL = Path(__file__).resolve().parent / "assets" / "toy-kontext"
DEFAULT_MODEL = str(TOY_MODEL)  # the embedded default; the real model: black-forest-labs/FLUX.1-Kontext-dev


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default=None,
                        help="the image to edit (any format PIL reads); default: the model folder's example.png "
                             "(the toy model has one), then with no --prompt its example sweep")
    parser.add_argument("--prompt", default=None,
                        help="the edit instruction (STLoRA: defaults to the sub-prompts joined by ' and ')")
    parser.add_argument("--out", default=None,
                        help="output PNG for one edit (default outputs/edit.png), or the sweep folder "
                             "(default outputs/sweep)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="a diffusers-layout Kontext folder or hub repo id (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None,
                        help="denoising steps (default: 28, or the model folder's example.json)")
    parser.add_argument("--guidance", type=float, default=2.5, help="distilled guidance strength (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise, shared by every cell (default: %(default)s)")
    parser.add_argument("--height", type=int, default=None,
                        help="output height in pixels (default: the input's aspect ratio at about one megapixel)")
    parser.add_argument("--width", type=int, default=None, help="output width in pixels (give with --height)")
    parser.add_argument("--keep-size", action="store_true",
                        help="keep the input image's own size (floored to 16 px) instead of snapping it to the "
                             "nearest preferred Kontext resolution (about one megapixel)")
    parser.add_argument("--gstlora", default=None, help="GSTLoRA checkpoint (pytorch_lora_weights.safetensors or its folder)")
    parser.add_argument("--stlora", default=None, help="STLoRA checkpoint (selective_lora.pt / .safetensors or its folder)")
    parser.add_argument("--subprompts", nargs="+", default=None, help="STLoRA: the sub-instructions, one slider each")
    parser.add_argument("--alphas", type=parse_alphas, default=[-1.0, -0.5, 0.0, 0.5, 1.0],
                        help="comma-separated slider values of the sweep (default: -1,-0.5,0,0.5,1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: %(default)s)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="weights and activations dtype (default: %(default)s)")
    parser.add_argument("--offload", action="store_true", help="keep the text encoders on the CPU except while encoding")
    args = parser.parse_args(join_alphas(sys.argv[1:] if argv is None else argv))
    example = read_example(args.model)
    if args.image is None:
        if example is None:
            parser.error(f"--image is required: {args.model} has no example.json to edit by default")
        args.image = str(Path(args.model) / "example.png")
        if args.prompt is None and not (args.gstlora or args.stlora):  # the example sweep
            args.stlora, args.subprompts = str(Path(args.model) / "sliders" / "stlora"), example["subprompts"]
            args.keep_size = True
    if args.steps is None:
        args.steps = (example or {}).get("steps", 28)
    if (args.height is None) != (args.width is None):
        parser.error("give --height and --width together, or neither")
    if args.gstlora and args.stlora:
        parser.error("sweep one adapter at a time: --gstlora or --stlora")
    if args.stlora and not args.subprompts:
        parser.error("--stlora needs --subprompts (the sub-instructions its sliders control)")
    if args.subprompts and not args.stlora:
        parser.error("--subprompts needs --stlora")
    if args.prompt is None:
        if not args.subprompts:
            parser.error("--prompt is required (except for an STLoRA sweep, which joins the sub-prompts)")
        args.prompt = " and ".join(args.subprompts)
    return args


def read_example(model: str) -> dict | None:
    """A model folder's example.json: {"prompt", "subprompts", "steps"} of its bundled example.png."""
    path = Path(model) / "example.json"
    return json.loads(path.read_text()) if path.is_file() else None


def sweep_cells(args: argparse.Namespace) -> list[tuple[float, ...]]:
    """One alpha per slider for every cell: a row for GSTLoRA or one sub-prompt, a grid for two or more."""
    sliders = len(args.subprompts) if args.stlora else 1
    return list(itertools.product(args.alphas, repeat=sliders))


def run_sweep(pipe: SliderEditFluxKontextPipeline, args: argparse.Namespace, out: Path) -> Path:
    method = "stlora" if args.stlora else "gstlora"
    if args.stlora:
        pipe.load_stlora(args.stlora)
    else:
        pipe.load_gstlora(args.gstlora)
    embeds, pooled = pipe.encode_prompt(args.prompt)  # once for the whole sweep

    (out / "cells").mkdir(parents=True, exist_ok=True)
    source = to_rgb(load_image(args.image))
    source.save(out / "source.png")
    images, cells = {}, []
    for alphas in sweep_cells(args):
        sliders = (dict(subprompts_list=args.subprompts, slider_alpha_list=list(alphas)) if args.stlora
                   else dict(slider_alpha=alphas[0]))
        image = pipe(image=source, prompt=args.prompt, prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                     num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.height,
                     width=args.width, auto_resize=not args.keep_size,
                     generator=torch.Generator("cpu").manual_seed(args.seed), **sliders).images[0]
        name = "cells/" + "_".join(f"{a:+.2f}" for a in alphas) + ".png"
        save_png(image, out / name)
        images[alphas] = image
        cells.append(SweepCell(alphas=alphas, image=name))
        print(f"  alphas {', '.join(f'{a:+.2f}' for a in alphas)} -> {out / name}")

    labels = [f"{a:+.2f}" for a in args.alphas]
    if len(cells[0].alphas) == 2:  # rows: first slider, columns: second
        rows = [[images[(a, b)] for b in args.alphas] for a in args.alphas]
        grid = labelled_grid(rows, labels, labels,
                             title=f"rows: '{args.subprompts[0]}'   columns: '{args.subprompts[1]}'")
    else:
        grid = labelled_grid([[images[c.alphas] for c in cells]], None, [", ".join(f"{a:+.2f}" for a in c.alphas) for c in cells])
    save_png(grid, out / "grid.png")
    save_gif([with_caption(images[c.alphas], "alpha " + ", ".join(f"{a:+.2f}" for a in c.alphas)) for c in cells],
             out / "sweep.gif")
    write_sweep(out, Sweep(source_image="source.png", prompt=args.prompt, subprompts=args.subprompts, seed=args.seed,
                           method=method, model=str(args.model), steps=args.steps, guidance=args.guidance, cells=cells))
    print(f"wrote {out / 'grid.png'}, {out / 'sweep.gif'} and {out / 'sweep.json'}")
    return out


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    pipe = SliderEditFluxKontextPipeline.from_pretrained(args.model, torch_dtype=getattr(torch, args.dtype),
                                                         device=args.device, offload=args.offload)
    if args.gstlora or args.stlora:
        return run_sweep(pipe, args, Path(args.out or "outputs/sweep"))
    image = pipe(image=args.image, prompt=args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                 height=args.height, width=args.width, auto_resize=not args.keep_size,
                 generator=torch.Generator("cpu").manual_seed(args.seed)).images[0]
    out = save_png(image, args.out or "outputs/edit.png")
    print(f"wrote {out} ({image.width}x{image.height})")
    return out


if __name__ == "__main__":
    try:
        main()
    except (ValueError, TypeError, OSError) as err:  # CheckpointError is a ValueError: one readable line
        raise SystemExit(f"error: {err}") from None
