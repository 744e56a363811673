"""Loading a >= 2 GB bf16 diffusers-layout transformer folder: `load_flux` vs diffusers (+ accelerate).

The script writes a random-weight FLUX transformer folder (hidden 1024 = 8 heads x 128, FLUX's 19 double
and 38 single blocks: 1.29 B parameters, 2.6 GB in bf16, three shards and an index, as the real folder
has) under /tmp, and deletes it at the end. Each load runs in a fresh process; the two sides alternate,
and which goes first alternates too. A side's time is the load call plus one read of every 4 KiB page of
every parameter, and its peak RSS is taken after that read: diffusers memory-maps the files and leaves
the weights on disk until something reads them, so "loaded" means ready to compute for both. The files
are read once beforehand so that both sides find them in the page cache.

    python benchmarks/bench_loading.py [--repeats 3] [--layers 19]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARD_BYTES = 1_000_000_000


def write_folder(folder: Path, layers: int) -> int:
    """A diffusers `transformer/` folder with random bf16 weights, sharded like the real one; -> bytes."""
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    config = dict(num_layers=layers, num_single_layers=2 * layers, attention_head_dim=128, num_attention_heads=8,
                  joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56), guidance_embeds=True)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    folder.mkdir(parents=True)
    model.save_config(folder)
    generator = torch.Generator().manual_seed(0)
    shards, shard, size = [], {}, 0
    for name, meta in model.state_dict().items():
        shard[name] = torch.randn(meta.shape, generator=generator).mul_(0.02).to(torch.bfloat16)
        size += shard[name].numel() * 2
        if size >= SHARD_BYTES:
            shards.append(shard)
            shard, size = {}, 0
    shards.append(shard) if shard else None
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        file = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, folder / file)
        for name, t in tensors.items():
            weight_map[name] = file
            total += t.numel() * 2
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return total


def peak_rss_mb() -> float:
    """This process image's peak resident set (VmHWM). Not ru_maxrss: Linux carries that one over from
    the parent across fork + exec, so every child would report at least the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(which: str, folder: str) -> dict:
    """Load once and read every page; called in a child process."""
    import torch

    if which == "ours":
        from slideredit.transformer_loading import load_flux

        def load():
            return load_flux(folder, dtype=torch.bfloat16)
    else:
        from diffusers import FluxTransformer2DModel
        accelerate = importlib.util.find_spec("accelerate") is not None

        def load():
            return FluxTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16, low_cpu_mem_usage=accelerate)
    baseline = peak_rss_mb()
    start = time.perf_counter()
    model = load()
    checksum = 0.0
    for p in model.parameters():  # one element per 4 KiB page
        flat = p.detach().reshape(-1)
        checksum += float(flat[:: max(1, 4096 // p.element_size())].float().sum())
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    params = sum(p.numel() for p in model.parameters())
    return dict(seconds=seconds, peak_rss_mb=peak, baseline_mb=baseline, params=params, checksum=checksum)


def child(which: str, folder: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", which, folder], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"{which} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> str:
    return f"min {min(values):.3f} / median {statistics.median(values):.3f} / max {max(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="processes per side (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=19, help="double blocks; single = 2x (default: %(default)s)")
    parser.add_argument("--folder", type=Path, help="use this existing transformer folder instead of writing one")
    parser.add_argument("--child", nargs=2, metavar=("WHICH", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(*args.child)))
        return

    import torch

    accelerate = importlib.util.find_spec("accelerate") is not None
    print(f"CPU: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
          f"diffusers low_cpu_mem_usage={accelerate} (accelerate {'installed' if accelerate else 'missing'})")
    tmp = Path(tempfile.mkdtemp(prefix="bench_loading_", dir="/tmp"))
    try:
        folder = args.folder or tmp / "transformer"
        total = sum(f.stat().st_size for f in folder.glob("*.safetensors")) if args.folder else write_folder(folder, args.layers)
        for f in folder.glob("*.safetensors"):  # into the page cache, for both sides alike
            with open(f, "rb") as handle:
                while handle.read(2**26):
                    pass
        print(f"folder: {total / 1e9:.2f} GB bf16 in {len(list(folder.glob('*.safetensors')))} shards")
        runs = {"ours": [], "diffusers": []}
        for r in range(args.repeats):
            for which in (("ours", "diffusers") if r % 2 == 0 else ("diffusers", "ours")):
                result = child(which, str(folder))
                runs[which].append(result)
                print(f"  {which:9s} {result['seconds']:6.2f} s  peak RSS {result['peak_rss_mb']:7.0f} MB "
                      f"(after imports {result['baseline_mb']:.0f} MB)")
        assert runs["ours"][0]["params"] == runs["diffusers"][0]["params"]
        time_ratio = [o["seconds"] / d["seconds"] for o, d in zip(runs["ours"], runs["diffusers"])]
        rss_ratio = [o["peak_rss_mb"] / d["peak_rss_mb"] for o, d in zip(runs["ours"], runs["diffusers"])]
        above = [(o["peak_rss_mb"] - o["baseline_mb"]) / (d["peak_rss_mb"] - d["baseline_mb"])
                 for o, d in zip(runs["ours"], runs["diffusers"])]
        for which, rs in runs.items():
            print(f"{which:9s} time median {statistics.median(r['seconds'] for r in rs):.2f} s, "
                  f"peak RSS median {statistics.median(r['peak_rss_mb'] for r in rs):.0f} MB")
        print(f"ours / diffusers time:      {spread(time_ratio)}   (goal <= 1.0)")
        print(f"ours / diffusers peak RSS:  {spread(rss_ratio)}   (goal <= 1.05)")
        print(f"  same, above each process's RSS after imports: {spread(above)}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
