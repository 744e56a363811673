"""One Kontext denoising step with sliders active: ours vs diffusers + peft, same weights, same adapter.

Variants (each in a fresh process, alternating, so peak memory is its own):
  gst   GSTLoRA on all its targets, one global slider alpha = 0.7
  st    STLoRA with two sliders (alpha 0.8 and -0.5) on two spans of the 512 text tokens, 0 elsewhere.
        diffusers + peft has no per-token selection: the peer multiplies each PEFT LoRA branch's
        output by the per-token scale with a forward hook (what a user adds on top of peft).
CPU (default): a mid-size model (hidden 768, 2 double + 4 single blocks, 512 text + 2 x 1024 image
tokens, fp32); `--device cuda`: the full 1024x1024 Kontext shape (19 + 38 blocks, hidden 3072, 512 text
+ 2 x 4096 image tokens), random weights made on the GPU, bf16. Both get the adapter in the dtype a user
loads it in: the model's (bf16 on the GPU) for diffusers + peft; ours reads it as load_adapter does (fp32
parameters, cast to the model's dtype once, when a layer stacks its adapters). Prints median step time
and peak memory of each, and the ratios ours / (diffusers + peft): time as min / median / max over the
rounds (round i runs every variant once, in turn, so ratio i compares processes run back to back).

    python benchmarks/bench_step.py [--device cuda] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

RANK = 16
SPANS = ((5, 12, 0.8), (16, 22, -0.5))  # (first token, end token, alpha) of the two STLoRA sub-prompts


def config(device: str) -> dict:
    if device == "cuda":
        return dict(layers=19, single=38, heads=24, text=512, side=64, dtype=torch.bfloat16)
    return dict(layers=2, single=4, heads=6, text=512, side=32, dtype=torch.float32)


def release_adapter(kind: str, layers: int, single: int, dim: int, device: str, dtype) -> dict[str, torch.Tensor]:
    """Random adapter tensors under the release's names (manifests/slideredit_*_upstream.json)."""
    g = torch.Generator(device).manual_seed(1)
    rand = lambda *shape: 0.02 * torch.randn(*shape, generator=g, device=device, dtype=dtype)
    mlp = 4 * dim
    double = {"gstlora": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                          "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                          "ff_context.net.0.proj", "ff_context.net.2"],
              "stlora": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
                         "ff_context.net.0.proj", "ff_context.net.2"]}[kind]
    shapes = lambda m: (mlp, dim) if m.endswith("net.0.proj") else (dim, mlp) if m.endswith("net.2") else (dim, dim)
    out = {}
    prefix = "transformer." if kind == "gstlora" else ""
    for i in range(layers):
        for m in double:
            d_out, d_in = shapes(m)
            out[f"{prefix}transformer_blocks.{i}.{m}.lora_A.weight"] = rand(RANK, d_in)
            out[f"{prefix}transformer_blocks.{i}.{m}.lora_B.weight"] = rand(d_out, RANK)
    if kind == "gstlora":
        for i in range(single):
            for m in ("attn.to_q", "attn.to_k", "attn.to_v"):
                out[f"{prefix}single_transformer_blocks.{i}.{m}.lora_A.weight"] = rand(RANK, dim)
                out[f"{prefix}single_transformer_blocks.{i}.{m}.lora_B.weight"] = rand(dim, RANK)
    return out


def token_scale(text: int, device: str) -> torch.Tensor:
    scale = torch.zeros(1, text, device=device)
    for start, end, alpha in SPANS:
        scale[:, start:end] = alpha
    return scale


def run(variant: str, device: str, repeats: int) -> dict:
    from diffusers import FluxTransformer2DModel
    from diffusers.utils import logging

    logging.set_verbosity_error()
    c = config(device)
    dim = c["heads"] * 128
    kind, impl = variant.split("-")
    with torch.device(device):
        torch.manual_seed(0)
        reference = FluxTransformer2DModel(num_layers=c["layers"], num_single_layers=c["single"],
                                           num_attention_heads=c["heads"], guidance_embeds=True).to(c["dtype"])
    adapter = release_adapter(kind, c["layers"], c["single"], dim, device, c["dtype"])
    n_img = c["side"] ** 2
    g = torch.Generator(device).manual_seed(0)
    rows = torch.arange(c["side"], device=device).repeat_interleave(c["side"])
    cols = torch.arange(c["side"], device=device).repeat(c["side"])
    ids = torch.cat([torch.stack([torch.full_like(rows, i), rows, cols], -1) for i in (0, 1)]).to(c["dtype"])
    img = torch.randn(1, 2 * n_img, 64, generator=g, device=device).to(c["dtype"])
    txt = torch.randn(1, c["text"], 4096, generator=g, device=device).to(c["dtype"])
    y = torch.randn(1, 768, generator=g, device=device).to(c["dtype"])
    t = torch.full((1,), 0.7, device=device, dtype=c["dtype"])
    guidance = torch.full((1,), 2.5, device=device, dtype=c["dtype"])
    txt_ids = torch.zeros(1, c["text"], 3, device=device, dtype=c["dtype"])

    if impl == "ours":
        import tempfile
        from pathlib import Path
        from safetensors.torch import save_file
        from slideredit import Flux, FluxParams
        from slideredit.slider_checkpoints import load_adapter
        from slideredit.sliders import set_slider_scale
        from slideredit.transformer_loading import diffusers_to_bfl

        weights, _ = diffusers_to_bfl(reference.state_dict())
        del reference
        with torch.device("meta"):
            model = Flux(FluxParams(depth=c["layers"], depth_single_blocks=c["single"], num_heads=c["heads"],
                                    hidden_size=dim))
        model.load_state_dict(weights, assign=True)
        del weights
        with tempfile.TemporaryDirectory() as tmp:
            name = "pytorch_lora_weights.safetensors" if kind == "gstlora" else "selective_lora.safetensors"
            save_file({k: v.cpu() for k, v in adapter.items()}, Path(tmp) / name)
            load_adapter(model, kind, Path(tmp) / name)
        set_slider_scale(model, kind, 0.7 if kind == "gstlora" else token_scale(c["text"], device))
        step = lambda: model(img, ids[None], txt, txt_ids, t, y, guidance)
    else:
        reference.load_lora_adapter({k.removeprefix("transformer."): v for k, v in adapter.items()},
                                    adapter_name=kind, prefix=None)
        reference.set_adapters([kind], [0.7 if kind == "gstlora" else 1.0])
        if kind == "stlora":  # per-token scales on the LoRA branch of every text-stream layer
            scale = token_scale(c["text"], device)[..., None].to(c["dtype"])
            for name, module in reference.named_modules():
                if name.endswith(f"lora_B.{kind}"):
                    module.register_forward_hook(lambda m, a, out: out * scale)
        step = lambda: reference(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                                 img_ids=ids, txt_ids=txt_ids[0], guidance=guidance, return_dict=False)[0]

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        out = step().double()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    # a fingerprint of the output, so the parent can check that both implementations agree
    probe = torch.randn(out.shape, generator=torch.Generator(device).manual_seed(2), device=device, dtype=out.dtype)
    return dict(seconds=statistics.median(times), peak_mb=peak, norm=out.norm().item(), probe=(out * probe).sum().item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per process (default: %(default)s)")
    parser.add_argument("--processes", type=int, default=3,
                        help="rounds: processes per variant, alternating (default: %(default)s)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run(args.child, args.device, args.repeats)))
        return

    c = config(args.device)
    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.machine()} CPU"
    print(f"machine: {machine}; torch {torch.__version__}; {c['layers']} double + {c['single']} single blocks, "
          f"hidden {c['heads'] * 128}, {c['text']} text + 2 x {c['side'] ** 2} image tokens, {c['dtype']}, rank {RANK}")
    variants = ["gstlora-ours", "gstlora-peft", "stlora-ours", "stlora-peft"]
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(args.processes):
        for v in variants:
            out = subprocess.run([sys.executable, __file__, "--child", v, "--device", args.device,
                                  "--repeats", str(args.repeats)], check=True, capture_output=True, text=True)
            results[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {v: (statistics.median(r["seconds"] for r in rs), max(r["peak_mb"] for r in rs)) for v, rs in results.items()}
    for v in variants:
        print(f"{v:>14}: step {med[v][0] * 1e3:9.1f} ms   peak {'GPU' if args.device == 'cuda' else 'RSS'} "
              f"{med[v][1]:8.0f} MB")
    for kind in ("gstlora", "stlora"):
        ours, peer = med[f"{kind}-ours"], med[f"{kind}-peft"]
        ratios = sorted(a["seconds"] / b["seconds"] for a, b in zip(results[f"{kind}-ours"], results[f"{kind}-peft"]))
        a, b = results[f"{kind}-ours"][0], results[f"{kind}-peft"][0]
        agree = max(abs(a["norm"] - b["norm"]), abs(a["probe"] - b["probe"])) / b["norm"]
        print(f"{kind}: ours / (diffusers + peft): time {ratios[0]:.3f} / {statistics.median(ratios):.3f} / "
              f"{ratios[-1]:.3f} (min / median / max over {len(ratios)} rounds), peak memory {ours[1] / peer[1]:.3f}; "
              f"outputs agree to {agree:.1e} (relative)")


if __name__ == "__main__":
    main()
