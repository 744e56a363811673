"""Our FLUX transformer against diffusers' FluxTransformer2DModel: same weights, same inputs.

CPU (default): a mid-size model (hidden 768, 2 double + 4 single blocks, 128 text + 2 x 1024 image
tokens) in fp32 and bf16. `--device cuda`: the full Kontext [dev] shape (8704 tokens, 19 + 38 blocks,
hidden 3072) with random weights made on the GPU, bf16.

Prints, per dtype: median forward time of each (repeats interleaved so both see the same machine
state), the ratio ours / diffusers (min / median / max over the repetitions), the max error between them, and the achieved FLOP rate of our
forward as a fraction of a large GEMM's rate measured in the same run.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from slideredit import Flux, FluxParams
from slideredit.transformer_loading import diffusers_to_bfl


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def forward_flops(params: FluxParams, text: int, image: int) -> float:
    """Multiply-adds x 2 of one forward: every linear on every token it sees, plus attention."""
    d, m, n = params.hidden_size, params.mlp_hidden_dim, text + image
    per_double = (text + image) * 2 * (3 * d * d + d * d + 2 * d * m)  # qkv, proj, mlp for each stream's tokens
    per_single = n * 2 * (d * (3 * d + m) + (d + m) * d)
    attention = 2 * 2 * n * n * d  # QK^T and PV over all heads
    embed = 2 * (image * params.in_channels * d + text * params.context_in_dim * d + image * d * params.out_channels)
    return params.depth * (per_double + attention) + params.depth_single_blocks * (per_single + attention) + embed


def gemm_rate(dtype: torch.dtype, device: str, size: int) -> float:
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    a @ b
    best = min(timed(lambda: a @ b, device) for _ in range(5))
    return 2 * size**3 / best


def build_pair(params: FluxParams, dtype: torch.dtype, device: str):
    from diffusers import FluxTransformer2DModel
    from diffusers.utils import logging

    logging.set_verbosity_error()

    with torch.device(device):
        reference = FluxTransformer2DModel(
            patch_size=1, in_channels=params.in_channels, num_layers=params.depth,
            num_single_layers=params.depth_single_blocks, attention_head_dim=params.head_dim,
            num_attention_heads=params.num_heads, joint_attention_dim=params.context_in_dim,
            pooled_projection_dim=params.vec_in_dim, guidance_embeds=True, axes_dims_rope=params.axes_dim,
        ).to(dtype).eval()
        with torch.no_grad():
            for p in reference.parameters():
                p.normal_(0, 0.02)
    weights, _ = diffusers_to_bfl(reference.state_dict())
    with torch.device("meta"):
        ours = Flux(params)
    ours.load_state_dict(weights, assign=True)
    return ours.eval(), reference


def inputs(params: FluxParams, text: int, side: int, dtype: torch.dtype, device: str):
    g = torch.Generator(device).manual_seed(0)
    rows = torch.arange(side, device=device).repeat_interleave(side)
    cols = torch.arange(side, device=device).repeat(side)
    ids = torch.cat([torch.stack([torch.full_like(rows, i), rows, cols], -1) for i in (0, 1)]).to(dtype)
    return dict(
        img=torch.randn(1, ids.shape[0], params.in_channels, generator=g, device=device, dtype=dtype),
        img_ids=ids[None], txt=torch.randn(1, text, params.context_in_dim, generator=g, device=device, dtype=dtype),
        txt_ids=torch.zeros(1, text, 3, device=device, dtype=dtype),
        timesteps=torch.full((1,), 0.5, device=device, dtype=dtype),
        y=torch.randn(1, params.vec_in_dim, generator=g, device=device, dtype=dtype),
        guidance=torch.full((1,), 2.5, device=device, dtype=dtype),
    )


def bench(params: FluxParams, text: int, side: int, dtype: torch.dtype, device: str, repeats: int, gemm: int) -> None:
    ours, reference = build_pair(params, dtype, device)
    x = inputs(params, text, side, dtype, device)

    def run_ours():
        return ours(**x)

    def run_reference():
        return reference(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                         timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0],
                         guidance=x["guidance"], return_dict=False)[0]

    with torch.inference_mode():
        a, b = run_ours(), run_reference()  # warm-up, and the error check
        err = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
        t_ours, t_ref = [], []
        for _ in range(repeats):
            t_ours.append(timed(run_ours, device))
            t_ref.append(timed(run_reference, device))
    del ours, reference
    if device == "cuda":
        torch.cuda.empty_cache()
    mo, mr = statistics.median(t_ours), statistics.median(t_ref)
    ratios = sorted(o / r for o, r in zip(t_ours, t_ref))  # repetition i: ours then diffusers, back to back
    flops = forward_flops(params, text, 2 * side * side)
    peak = gemm_rate(dtype, device, gemm)
    print(f"{str(dtype).removeprefix('torch.'):>8}  ours {mo * 1e3:9.1f} ms  diffusers {mr * 1e3:9.1f} ms  "
          f"ratio {ratios[0]:5.3f} / {statistics.median(ratios):5.3f} / {ratios[-1]:5.3f} (min / median / max)  "
          f"max rel err {err:.1e}  "
          f"ours {flops / mo / 1e12:6.2f} TFLOP/s = {flops / mo / peak:4.2f} of a {gemm}^3 GEMM "
          f"({peak / 1e12:.2f} TFLOP/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=None, help="timed forwards per model (default 7 CPU, 20 CUDA)")
    parser.add_argument("--dtypes", default=None, help="comma list, e.g. float32,bfloat16 (default: both on CPU, bf16 on CUDA)")
    args = parser.parse_args()

    if args.device == "cuda":
        params, text, side, gemm = FluxParams.kontext_dev(), 512, 64, 8192
        dtypes = args.dtypes or "bfloat16"
        machine = torch.cuda.get_device_name()
    else:
        params = FluxParams(vec_in_dim=768, context_in_dim=4096, hidden_size=768, num_heads=6, depth=2,
                            depth_single_blocks=4, axes_dim=(16, 56, 56))
        text, side, gemm = 128, 32, 2048
        dtypes = args.dtypes or "float32,bfloat16"
        machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    repeats = args.repeats or (20 if args.device == "cuda" else 7)
    print(f"machine: {machine}; torch {torch.__version__}")
    print(f"model: hidden {params.hidden_size}, {params.depth} double + {params.depth_single_blocks} single blocks; "
          f"tokens {text} text + 2 x {side * side} image; {repeats} interleaved repeats")
    for name in dtypes.split(","):
        bench(params, text, side, getattr(torch, name), args.device, repeats, gemm)


if __name__ == "__main__":
    main()
