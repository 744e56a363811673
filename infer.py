"""Edit an image with FLUX.1 Kontext [dev]:

    python infer.py --image photo.png --prompt "make the sky pink" --out edited.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from slideredit.atomic import atomic_path
from slideredit.pipelines import SliderEditFluxKontextPipeline

DEFAULT_MODEL = "black-forest-labs/FLUX.1-Kontext-dev"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", required=True, help="the image to edit (any format PIL reads)")
    parser.add_argument("--prompt", required=True, help="the edit instruction")
    parser.add_argument("--out", default="outputs/edit.png", help="where to write the edited PNG (default: %(default)s)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="a diffusers-layout Kontext folder or hub repo id (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=28, help="denoising steps (default: %(default)s)")
    parser.add_argument("--guidance", type=float, default=2.5, help="distilled guidance strength (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default: %(default)s)")
    parser.add_argument("--height", type=int, default=None,
                        help="output height in pixels (default: the input's aspect ratio at about one megapixel)")
    parser.add_argument("--width", type=int, default=None, help="output width in pixels (give with --height)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: %(default)s)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="weights and activations dtype (default: %(default)s)")
    parser.add_argument("--offload", action="store_true", help="keep the text encoders on the CPU between prompts")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    if (args.height is None) != (args.width is None):
        raise SystemExit("error: give --height and --width together, or neither")
    pipe = SliderEditFluxKontextPipeline.from_pretrained(args.model, torch_dtype=getattr(torch, args.dtype),
                                                         device=args.device, offload=args.offload)
    generator = torch.Generator("cpu").manual_seed(args.seed)
    image = pipe(image=args.image, prompt=args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                 height=args.height, width=args.width, generator=generator).images[0]
    out = Path(args.out)
    with atomic_path(out) as tmp:
        image.save(tmp, format="PNG")
    print(f"wrote {out} ({image.width}x{image.height})")
    return out


if __name__ == "__main__":
    try:
        main()
    except (ValueError, TypeError, OSError) as err:  # CheckpointError is a ValueError: one readable line
        raise SystemExit(f"error: {err}") from None
