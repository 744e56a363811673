"""Everything this project needs measured on a GPU, in one command that fits a short GPU loan.

    python benchmarks/gpu_report.py --out reports/h100          # one H100/H200: <= 8 minutes
    python benchmarks/gpu_report.py --out /tmp/smoke --smoke    # the same code at tiny shapes, CPU

Random weights at the real FLUX.1 Kontext [dev] shapes (built on the meta device, materialised with
torch.empty on the GPU and filled with small random values: nothing is downloaded and nothing is ever
allocated on the CPU), bf16. The parts, run in this order (one module each in gpu_report_parts/):
  pipeline_edit        a complete 28-step 1024^2 edit through SliderEditFluxKontextPipeline with a GSTLoRA
                       slider, first and second call; then the same edit in the low-memory mode (fp8
                       transformer, GSTLoRA + STLoRA, tiled decode) from a prompt through T5-XXL and CLIP-L, its
                       peak against the 16 GB goal and each phase's peak beside pipe.memory_plan's. It runs
                       first so that its first call pays what a fresh process pays: kernel compilation,
                       autotuning, the dispatch measurement
  kernel_correctness   the fused kernel against fp32 math at every adapted layer shape, forward and backward,
                       bf16, fp16 and fp8 weights
  kernel_timing        timing per layer shape: bare F.linear, fused Triton, the PyTorch path, a PEFT-style
                       layer, backend=None ("auto"), and fp8 weights, as % over bare
  transformer_forward  a full transformer forward: base, GSTLoRA, STLoRA, both, both compiled; then diffusers'
                       FluxTransformer2DModel + peft beside it when importable
  training_step        GSTLoRA and STLoRA training steps at 512^2 and 1024^2, gradient checkpointing on and off
  fsdp_memory          with 2+ GPUs, one process per GPU shards the transformer with FSDP2 (as `--sharding fsdp`
                       trains) and runs one STLoRA step at 512^2: local parameter bytes and peak memory per rank;
                       else "not measured". Both: the per-rank split for 2/4/8 ranks from the parameters' sizes
then report.json and report.md in --out (GPU, driver, torch, triton), the markdown also printed. First of
all it prints the planned device memory of FLUX.1 Kontext [dev]'s low-memory edit at 1024^2 per phase (from
the tensors' sizes on the meta device: slideredit/memory_plan.py), smoke runs included.
Each part has a time budget (printed first; 400 s in all, plus at most 34 s for the peer and the
model build: about 7.6 minutes, with headroom for a case that compiles past its slot): pipeline_edit
108 s, kernel_correctness 88 s, kernel_timing 56 s, transformer_forward 68 s, training_step 80 s. A part
stops at the end of its slot in that schedule (so one that overran shortens the next ones), and a case
that runs out of memory is recorded as such, both with a note in the report; a part that fails becomes
a note too, and the report is rewritten after every part. Timings are min / median / max of a few
repetitions. fsdp_memory's 32 s (0.08 of the budget, on top of the 400 s) is spent only with 2+ GPUs: it
runs last, so a one-GPU report's schedule is unchanged. --smoke runs every part at tiny shapes on the CPU
(Triton in its interpreter): its numbers mean nothing, it proves the script runs (the test suite runs it).
"""
from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # before slideredit.kernels is imported: Triton decides interpreted or compiled at import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse
import contextlib
import json
import platform
import subprocess
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from gpu_report_parts import (fsdp_memory, kernel_correctness, kernel_timing, pipeline_edit, training_step,
                              transformer_forward)
from gpu_report_parts.measure import exception_line, free_memory
from gpu_report_parts.random_models import random_transformer
from gpu_report_parts.setups import Part, Setup, real_setup, smoke_setup
from slideredit.atomic import atomic_path
from slideredit.memory_plan import full_size_pipeline, plan_table

# Share of the time budget per part, in run order; what a part leaves is not reused. pipeline_edit's holds
# building the transformer and four 28-step edits (bf16 and fp8, a first and a second call each).
BUDGET_SHARES = {"pipeline_edit": 0.27, "kernel_correctness": 0.22, "kernel_timing": 0.14,
                 "transformer_forward": 0.17, "training_step": 0.20, "fsdp_memory": 0.08}
TITLES = {"pipeline_edit": "28-step edit through the pipeline, bf16 and fp8",
          "kernel_correctness": "kernel correctness against fp32 math",
          "kernel_timing": "kernel timing per layer shape",
          "transformer_forward": "full transformer forward",
          "training_step": "training step",
          "fsdp_memory": "FSDP memory per rank (2+ GPUs)"}
MODEL_PARTS = {"pipeline_edit", "transformer_forward", "training_step"}  # the parts that share one transformer


def machine(setup: Setup) -> dict:
    info = {"setup": setup.name, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    info["triton interpreter"] = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if setup.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    capability=f"{props.major}.{props.minor}")
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
        except (OSError, subprocess.SubprocessError):
            info["driver"] = "unknown (no nvidia-smi)"
    else:
        info["gpu"] = "none (CPU run)"
    with contextlib.suppress(ImportError):
        from slideredit.kernels import dispatch

        path = dispatch.default_cache_path()
        info["dispatch cache file"] = f"{path} ({'present' if path.exists() else 'absent'} at start)"
    return info


def markdown(info: dict, parts: dict[str, dict]) -> str:
    lines = ["# GPU report", ""] + [f"- {k}: {v}" for k, v in info.items()] + [""]
    for name, part in parts.items():
        lines += [f"## {name}: {part['title']}", "",
                  f"budget {part['budget_s']:.0f} s, took {part['seconds']:.1f} s", ""]
        rows = part["rows"]
        if rows:
            columns = list(dict.fromkeys(c for row in rows for c in row))
            lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
            lines.append("")
        lines += [f"- {note}" for note in part["notes"]] + [""]
    return "\n".join(lines)


def write_report(out: Path, info: dict, parts: dict[str, dict]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(info, parts)
    with atomic_path(out / "report.json") as tmp:
        tmp.write_text(json.dumps({"machine": info, "parts": parts}, indent=1, default=str))
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(text)
    return text


def planned_memory() -> dict[str, str]:
    """Print the planned device memory per phase of FLUX.1 Kontext [dev]'s low-memory edit (quantize="fp8",
    from_pretrained's placement) at 1024^2, batch 1, T5 in bf16 and in fp8: a model from the tensors' sizes
    on the meta device, which the pipeline_edit part measures on a GPU. -> the peaks, for the report."""
    peaks = {}
    for t5 in ("bf16", "fp8"):
        plan = full_size_pipeline(quantize="fp8", t5_quantize="fp8" if t5 == "fp8" else None).memory_plan(1024, 1024)
        print(f"planned device memory, FLUX.1 Kontext [dev] low-memory edit (fp8 transformer, T5 {t5}), 1024^2, "
              f"batch 1 (a model from the tensors' sizes):\n{plan_table(plan)}", flush=True)
        peaks[f"memory plan GB, fp8 1024^2, T5 {t5}"] = ", ".join(f"{k} {v.peak / 1e9:.2f}" for k, v in plan.items())
    return peaks


def run(setup: Setup, out: Path, budget_s: float, parts: tuple[str, ...] = tuple(BUDGET_SHARES)) -> dict[str, dict]:
    budgets = {name: BUDGET_SHARES[name] * budget_s for name in parts}
    print(f"{setup.name} on {setup.device}; time budget {budget_s:.0f} s: " +
          ", ".join(f"{name} ({TITLES[name]}) {b:.0f} s" for name, b in budgets.items()), flush=True)
    info = {**machine(setup), **planned_memory()}
    torch.backends.cuda.matmul.allow_tf32 = False
    results: dict[str, dict] = {}
    model = None
    if MODEL_PARTS & set(parts):
        start = time.perf_counter()
        model = random_transformer(setup)
        info["transformer build s"] = round(time.perf_counter() - start, 2)
    runners = {"pipeline_edit": lambda d: pipeline_edit.measure(setup, model, d),
               "kernel_correctness": lambda d: kernel_correctness.measure(setup, d),
               "kernel_timing": lambda d: kernel_timing.measure(setup, d),
               "transformer_forward": lambda d: transformer_forward.measure(setup, model, d),
               "training_step": lambda d: training_step.measure(setup, model, d),
               "fsdp_memory": lambda d: fsdp_memory.measure(setup, d)}
    deadline = time.perf_counter()
    for name in parts:
        start = time.perf_counter()
        deadline += budgets[name]  # a schedule: a part that overran shortens the next ones, not the total
        print(f"part {name}: {TITLES[name]} (budget {budgets[name]:.0f} s, {deadline - start:.0f} s left for it)",
              flush=True)
        part = guarded(runners[name], deadline, setup.device)
        results[name] = {"title": TITLES[name], "budget_s": budgets[name], "seconds": time.perf_counter() - start,
                         "rows": part.rows, "notes": part.notes}
        print(f"part {name}: {results[name]['seconds']:.1f} s", flush=True)
        write_report(out, info, results)  # after every part: a run cut short still leaves its report
    if "transformer_forward" in parts:  # the peer last, after ours is freed: both at once would double the weights
        model = None
        free_memory(setup.device)
        start = time.perf_counter()
        peer = guarded(lambda d: transformer_forward.measure_peer(setup, d),
                       start + BUDGET_SHARES["transformer_forward"] * budget_s * 0.5, setup.device)
        results["transformer_forward"]["rows"] += peer.rows
        results["transformer_forward"]["notes"] += peer.notes
        results["transformer_forward"]["seconds"] += time.perf_counter() - start
    print(write_report(out, info, results), flush=True)
    return results


def guarded(part: Callable[[float], Part], deadline: float, device: str) -> Part:
    """Run one part; a failure becomes a note (with its last traceback line), so the other parts still run."""
    try:
        return part(deadline)
    except Exception as e:
        where = traceback.extract_tb(e.__traceback__)[-1]
        return Part([], [f"part failed: {exception_line(e, 200)} ({Path(where.filename).name}:{where.lineno})"])
    finally:
        free_memory(device)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder for report.json and report.md")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreted)")
    parser.add_argument("--budget-s", type=float, default=400,
                        help="seconds for all parts together (default: %(default)s; the peer's forward adds at "
                             "most half of transformer_forward's share)")
    parser.add_argument("--parts", default=",".join(BUDGET_SHARES),
                        help="which parts, comma-separated, in order (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--smoke needs TRITON_INTERPRET=1 before slideredit.kernels is imported")
        setup = smoke_setup()
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run with --smoke for the CPU version")
        setup = real_setup("cuda")
    parts = tuple(args.parts.split(","))
    unknown = [name for name in parts if name not in BUDGET_SHARES]
    if unknown:
        parser.error(f"--parts takes names from {','.join(BUDGET_SHARES)}, got {', '.join(map(repr, unknown))}")
    return run(setup, args.out, args.budget_s, parts)


if __name__ == "__main__":
    main()
