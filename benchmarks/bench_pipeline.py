"""One full Kontext edit, ours vs diffusers' FluxKontextPipeline, on the same mid-size random model folder.

Each run is a fresh process (so peak RSS is that pipeline's own); runs alternate between the two.
Prints the median edit time (after loading) and the peak RSS of each, and the ratios ours / diffusers
(time: min / median / max over the alternating rounds).

    python benchmarks/bench_pipeline.py [--size 512] [--steps 4] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# hidden 512 (4 heads x 128, FLUX's RoPE split), 2 double + 4 single blocks; tiny text encoders and VAE
TRANSFORMER = dict(num_layers=2, num_single_layers=4, attention_head_dim=128, num_attention_heads=4,
                   axes_dims_rope=(16, 56, 56))


def run_one(which: str, folder: str, size: int, steps: int) -> dict:
    """Load one pipeline and time one edit; called in a child process."""
    import numpy as np
    import torch
    from PIL import Image

    torch.manual_seed(0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    common = dict(image=image, prompt="make the hair red", height=size, width=size, num_inference_steps=steps,
                  guidance_scale=2.5, generator=torch.Generator().manual_seed(0), output_type="pt")
    if which == "ours":
        from slideredit.pipelines import SliderEditFluxKontextPipeline
        pipe = SliderEditFluxKontextPipeline.from_pretrained(folder, torch_dtype=torch.float32)
        extra = dict(auto_resize=False)
    else:
        from diffusers import FluxKontextPipeline
        pipe = FluxKontextPipeline.from_pretrained(folder, torch_dtype=torch.float32)
        extra = dict(_auto_resize=False, max_area=size * size)
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        start = time.perf_counter()
        pipe(**common, **extra)
        seconds = time.perf_counter() - start
    return dict(seconds=seconds, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="input and output side in pixels (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="processes per pipeline (default: %(default)s)")
    parser.add_argument("--child", nargs=2, metavar=("WHICH", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child[0], args.child[1], args.size, args.steps)))
        return

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_kontext import build_tiny_kontext_folder

    with tempfile.TemporaryDirectory() as tmp:
        folder = str(build_tiny_kontext_folder(Path(tmp) / "model", transformer_config=TRANSFORMER))
        results: dict[str, list[dict]] = {"ours": [], "diffusers": []}
        for _ in range(args.repeats):
            for which in results:
                out = subprocess.run([sys.executable, __file__, "--child", which, folder, "--size", str(args.size),
                                      "--steps", str(args.steps)], check=True, capture_output=True, text=True)
                results[which].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"machine: {platform.machine()}, CPU; edit {args.size}x{args.size}, {args.steps} steps, "
          f"transformer hidden 512, 2 double + 4 single blocks; {args.repeats} processes each, alternating")
    summary = {}
    for which, runs in results.items():
        summary[which] = (statistics.median(r["seconds"] for r in runs), max(r["peak_rss_mb"] for r in runs))
        print(f"{which:>10}: edit {summary[which][0]:7.2f} s   peak RSS {summary[which][1]:7.0f} MB")
    ratios = sorted(o["seconds"] / d["seconds"] for o, d in zip(results["ours"], results["diffusers"]))
    print(f"ratio ours/diffusers: time {ratios[0]:.3f} / {statistics.median(ratios):.3f} / {ratios[-1]:.3f} "
          f"(min / median / max over {len(ratios)} rounds, round i = the i-th process of each), "
          f"peak RSS {summary['ours'][1] / summary['diffusers'][1]:.3f}")


if __name__ == "__main__":
    main()
