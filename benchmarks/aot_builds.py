"""Ahead-of-time builds of the fused LoRA kernels for each GPU, on this CPU: what each card would compile.

Every launch the kernels make for FLUX.1 Kontext [dev] is replayed on meta tensors through the real
launcher (kernels/masked_lora.py's autograd function, forward and backward, with the Triton kernels'
launches intercepted and the card answering the launcher's `device_target`), so the builds have exactly
the launcher's arguments, specialisation and build flags on each card. Each launch is then compiled
with Triton for every candidate config of its autotuner (kept or pruned for the card, as the launcher's
pruning decides) and each build is checked with Triton's bundled ptxas: registers, spill bytes, shared
memory against the card's limit, and the tensor-core instruction used. --quick builds, per card, kernel
and weight dtype, only the kept config closest to the card's limits (shared memory, then registers).

The grid: the adapted linears (GSTLoRA's targets: double-block qkv, proj, mlp.0, mlp.2 of both streams
and the single blocks' linear1) at 8704 tokens (a 1024^2 edit), bf16 and fp8 weights, bf16 and fp32
adapters, stacked ranks 16 and 32: the fused GEMM forward and dX and both shrinks; and fp8_linear (the
fp8 layers without adapters: modulation linears at batch 1, linear2 at 8704 tokens), forward and dX.
Layers whose builds are identical (same dtypes, flags and specialisation) are built once.

Each build is one JSON object with exactly these keys:
  arch          compute capability (80, 86, 89, 90)
  kernel        gemm_forward, gemm_dx, shrink_forward, shrink_backward, fp8_linear_forward, fp8_linear_dx
  weight_dtype  torch's name of the operand multiplied with x: the layer's weight for the GEMMs, the
                adapter (A, or B in the backward) for the shrinks
  config        the autotune config (BLOCK_*, GROUP_M, num_warps, num_stages) and what else selects the
                build: adapter_dtype, stacked_rank (null without adapters), tokens (M)
  kept          whether the launcher's pruning keeps this config for the card
  ok            whether it compiled; error: the compiler's message when it did not (else null)
  registers, spill_bytes   per thread, from ptxas -v (null when it did not compile)
  shared_bytes  the shared memory the build needs (Triton's metadata.shared); smem_limit: the card's
  mma           wgmma, mma.sync or none: the tensor-core instruction in the PTX
  wgmma_in_flight   wgmma groups the main loop leaves in flight, the N of its `wgmma.wait_group N` in the
                PTX (0: it waits for each wgmma before it prepares the next tiles); null without a wgmma loop
  wgmma_serialized  whether ptxas serializes the wgmmas all the same (its C7515 message: it then waits
                for each in the SASS whatever the PTX says); null without wgmma

The exit status is 1 when a kept build fails, spills or needs more shared memory than the card has
(with --require-wgmma-in-flight also when a kept wgmma build keeps no wgmma in flight or is serialized).
Where the pruning's estimate of a build's shared memory is wrong, or it drops a build that would fit
without spilling, a note says so.

    python benchmarks/aot_builds.py --arch 80 86 89 90 --json builds.json   # ~500 builds, 30 min on 2 cores
    python benchmarks/aot_builds.py --arch 86 90 --quick --json quick.json   # one build per kernel family
    python benchmarks/aot_builds.py --arch 89 --kernel gemm_dx --weight-dtype float8_e4m3fn --json dx.json
    python benchmarks/aot_builds.py --arch 90 --quick --weight-dtype float8_e4m3fn --require-wgmma-in-flight \
        --json fp8.json
"""
from __future__ import annotations

import os

if __name__ == "__main__":  # real builds: the kernels must not be defined for the interpreter
    os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner, Heuristics  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from slideredit.kernels import masked_lora_triton as T  # noqa: E402
from slideredit.kernels.masked_lora import _MaskedLoraLinear  # noqa: E402
from slideredit.quantization import fp8_targets  # noqa: E402
from slideredit.sliders import gstlora_targets  # noqa: E402
from slideredit.transformer import Flux, FluxParams  # noqa: E402

KERNELS = ("gemm_forward", "gemm_dx", "shrink_forward", "shrink_backward", "fp8_linear_forward", "fp8_linear_dx")
TOKENS = 8704  # a 1024^2 edit: 4096 image + 4096 context + 512 text tokens (every count here builds alike)
MODULATION_TOKENS = 1  # the modulation linears see one row per image: batch 1
X_DTYPE = torch.bfloat16
WEIGHT_DTYPES = (torch.bfloat16, torch.float8_e4m3fn)
ADAPTER_DTYPES = (torch.bfloat16, torch.float32)
STACKED_RANKS = (16, 32)  # e.g. one rank-16 slider; or GSTLoRA + STLoRA, or one rank-32 slider
ADAPTERS = 2  # token-scale columns (K) for every stacked rank: K does not change the build


@dataclass
class Launch:
    """One kernel launch as the launcher makes it for a card: the autotuner's positional and keyword
    arguments."""

    target: T.GpuTarget
    kernel: str  # one of KERNELS
    weight_dtype: torch.dtype
    adapter_dtype: torch.dtype | None
    stacked_rank: int | None
    tokens: int
    tuner: Autotuner
    args: tuple
    kwargs: dict

    @property
    def named_args(self) -> dict:
        return dict(zip(self.tuner.arg_names, self.args))

    @property
    def is_gemm(self) -> bool:
        return self.tuner is T._fused_linear_kernel

    def candidates(self) -> list[triton.Config]:
        """The configs the pruning chooses among (for the GEMM: its tensor-core or FMA family)."""
        if self.is_gemm:
            return T.gemm_family(self.tuner.configs, self.named_args["x_ptr"].dtype, self.kwargs["INPUT_PRECISION"])
        return list(self.tuner.configs)

    def kept(self) -> list[triton.Config]:
        """The configs the launcher's pruning keeps on the card."""
        keep = T.keep_gemm_configs if self.is_gemm else T.keep_shrink_configs
        return keep(self.tuner.configs, self.named_args, self.target, **self.kwargs)


# ---------------------------------------------------------------------------------------------------
# The launches: the real launcher on meta tensors, the kernels' launches recorded instead of run
# ---------------------------------------------------------------------------------------------------

def flux_layers() -> tuple[list[tuple[int, int]], list[tuple[int, int, int]]]:
    """FLUX.1 Kontext [dev]'s distinct linear shapes: adapted (d_in, d_out), and the fp8 layers without
    adapters as (d_in, d_out, tokens)."""
    with torch.device("meta"):
        model = Flux(FluxParams.kontext_dev())
    adapted = gstlora_targets(model)
    shape = lambda name: (model.get_submodule(name).in_features, model.get_submodule(name).out_features)
    plain = {(*shape(name), MODULATION_TOKENS if name.endswith(("mod.lin", "modulation.lin")) else TOKENS)
             for name in fp8_targets(model) if name not in adapted}
    return sorted({shape(name) for name in adapted}), sorted(plain)


class _Recorder:
    """While active, the launcher sees `target` as the device's card, and the kernels' launches are
    recorded (under the current phase) instead of run."""

    def __init__(self, target: T.GpuTarget):
        self.target = target
        self.launches: list[tuple[str, object, tuple, dict]] = []
        self.phase = ""

    def __enter__(self):
        self.device_target = T.device_target
        T.device_target = lambda device: self.target
        for tuner in (T._scaled_shrink_kernel, T._fused_linear_kernel):
            tuner.run = lambda *args, grid, warmup, _tuner=tuner, **kwargs: self.launches.append(
                (self.phase, _tuner, args, kwargs))
        return self

    def __exit__(self, *exc):
        T.device_target = self.device_target
        for tuner in (T._scaled_shrink_kernel, T._fused_linear_kernel):
            del tuner.run  # back to the class's method


def _record_layer(target: T.GpuTarget, d_in: int, d_out: int, tokens: int, weight_dtype: torch.dtype,
                  adapter_dtype: torch.dtype | None, stacked_rank: int | None, backward: bool) -> list[Launch]:
    """The launches of one adapted (or, with adapter_dtype None, plain fp8) layer's forward and dX on `target`."""
    meta = lambda *shape, dtype=X_DTYPE, grad=False: torch.empty(*shape, dtype=dtype, device="meta",
                                                                  requires_grad=grad)
    x = meta(tokens, d_in, grad=backward)
    weight, bias = meta(d_out, d_in, dtype=weight_dtype), meta(d_out)
    weight_scale = meta(d_out, dtype=torch.float32) if weight_dtype == torch.float8_e4m3fn else None
    lora = (None, None, None, 0)
    if adapter_dtype is not None:
        lora = (meta(stacked_rank, d_in, dtype=adapter_dtype), meta(d_out, stacked_rank, dtype=adapter_dtype),
                meta(tokens, ADAPTERS, dtype=torch.float32), stacked_rank // ADAPTERS)
    with _Recorder(target) as recorder:
        recorder.phase = "forward"
        zero_scale = None  # compared per call (the Triton path masks zero scales itself)
        y = _MaskedLoraLinear.apply(x, weight, weight_scale, bias, *lora[:3], zero_scale, lora[3], "triton")
        if backward:
            recorder.phase = "backward"
            y.backward(torch.empty_like(y))
    launches = []
    for phase, tuner, args, kwargs in recorder.launches:
        if adapter_dtype is None:
            kernel = "fp8_linear_forward" if phase == "forward" else "fp8_linear_dx"
        elif tuner is T._scaled_shrink_kernel:
            kernel = f"shrink_{phase}"
        else:
            kernel = "gemm_forward" if phase == "forward" else "gemm_dx"
        operand = adapter_dtype if tuner is T._scaled_shrink_kernel else weight_dtype
        launches.append(Launch(target, kernel, operand, adapter_dtype, stacked_rank, tokens, tuner, args, kwargs))
    return launches


def flux_launches(arch: int) -> list[Launch]:
    """Every distinct launch of the grid (see the module's docstring) on sm_`arch`, in a stable order."""
    target = T.GpuTarget(arch, T.SMEM_LIMITS[arch])
    adapted, plain = flux_layers()
    launches = []
    for weight_dtype in WEIGHT_DTYPES:
        for adapter_dtype in ADAPTER_DTYPES:
            for rank in STACKED_RANKS:
                for d_in, d_out in adapted:
                    launches += _record_layer(target, d_in, d_out, TOKENS, weight_dtype, adapter_dtype, rank,
                                              backward=True)
    for d_in, d_out, tokens in plain:
        launches += _record_layer(target, d_in, d_out, tokens, torch.float8_e4m3fn, None, None,
                                  backward=tokens == TOKENS)  # modulation: vec never needs a gradient
    distinct = {}
    for launch in launches:
        distinct.setdefault(_build_identity(launch), launch)
    return sorted(distinct.values(), key=lambda ln: KERNELS.index(ln.kernel))


# ---------------------------------------------------------------------------------------------------
# Compiling one launch for one card
# ---------------------------------------------------------------------------------------------------

def _jit_function(tuner) -> JITFunction:
    fn = tuner.fn
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


def _launch_kwargs(launch: Launch, config: triton.Config) -> dict:
    """The keyword arguments the JIT function gets: the launch's, the config's, then the heuristics'."""
    kwargs = {**launch.kwargs, **config.all_kwargs()}
    fn = launch.tuner.fn
    while not isinstance(fn, JITFunction):
        if isinstance(fn, Heuristics):
            kwargs.update({name: rule({**launch.named_args, **kwargs}) for name, rule in fn.values.items()})
        fn = fn.fn
    return kwargs


def _source(launch: Launch, config: triton.Config) -> tuple[ASTSource, GPUTarget, dict]:
    """What JITFunction.run hands the compiler for this launch on its card: source, target and options."""
    target = GPUTarget("cuda", launch.target.arch, 32)
    backend = make_backend(target)
    fn = _jit_function(launch.tuner)
    kwargs = _launch_kwargs(launch, config)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), target, options.__dict__


def _build_identity(launch: Launch) -> tuple:
    """Two launches with the same identity compile to the same builds."""
    source, _, options = _source(launch, launch.tuner.configs[0])
    return launch.kernel, str(source.signature), str(source.attrs), str(sorted(launch.kwargs.items())), str(options)


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int, bool]:
    """(registers per thread, spill store bytes, whether it serializes the wgmmas: C7515) that ptxas
    reports for `ptx` on sm_`arch`, with the flags Triton's own ptxas call uses."""
    ptxas = get_ptxas(arch).path
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        result = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", str(source),
                                 "-o", str(Path(folder) / "kernel.cubin")], capture_output=True, text=True, check=True)
    registers = re.search(r"Used (\d+) registers", result.stderr)
    spills = re.search(r"(\d+) bytes spill stores", result.stderr)
    return int(registers.group(1)), int(spills.group(1)) if spills else 0, "(C7515)" in result.stderr


def mma_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    return "mma.sync" if re.search(r"\bmma\.sync\b", ptx) else "none"


def wgmmas_in_flight(ptx: str) -> int | None:
    """How many wgmma groups the main loop leaves in flight: the smallest N of its `wgmma.wait_group N`
    (0: each waits for the previous one before the next tile is prepared; 1: one stays in flight). The
    main loop is the innermost PTX loop (a label a later branch jumps back to) that issues wgmma; None when
    no loop does (no wgmma, e.g. below sm_90)."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"(\$?\w+):", line.strip()))}
    loops = []
    for i, line in enumerate(lines):
        branch = re.search(r"\bbra(?:\.uni)?\s+(\$?\w+);", line)
        if branch and labels.get(branch.group(1), i) < i:
            loops.append(lines[labels[branch.group(1)]:i + 1])
    loops = [body for body in loops if any("wgmma.mma_async" in line for line in body)]
    if not loops:
        return None
    main = min(loops, key=len)
    waits = [int(m.group(1)) for line in main if (m := re.search(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", line))]
    return min(waits) if waits else None


def compile_launch(launch: Launch, config: triton.Config):
    """Triton's compiled kernel for this launch and config on its card (raises as the launcher would)."""
    source, target, options = _source(launch, config)
    return triton.compile(source, target=target, options=options)


def _one_line(error: Exception) -> str:
    return f"{type(error).__name__}: " + " ".join(str(error).split())


def build(launch: Launch, config: triton.Config, kept: bool) -> dict:
    """One row of the JSON: compile, then read the build's resources."""
    arch = launch.target.arch
    row = {
        "arch": arch, "kernel": launch.kernel, "weight_dtype": str(launch.weight_dtype).removeprefix("torch."),
        "config": {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages,
                   "adapter_dtype": str(launch.adapter_dtype).removeprefix("torch.") if launch.adapter_dtype else None,
                   "stacked_rank": launch.stacked_rank, "tokens": launch.tokens},
        "kept": kept, "ok": False, "error": None, "registers": None, "spill_bytes": None, "shared_bytes": None,
        "smem_limit": launch.target.smem_limit, "mma": None, "wgmma_in_flight": None, "wgmma_serialized": None,
    }
    try:
        kernel = compile_launch(launch, config)
    except Exception as error:  # a build that fails is a result here, reported in the row
        row["error"] = _one_line(error)
        return row
    ptx = kernel.asm["ptx"]
    row["registers"], row["spill_bytes"], serialized = ptxas_usage(ptx, arch)
    row.update(ok=True, shared_bytes=kernel.metadata.shared, mma=mma_kind(ptx), wgmma_in_flight=wgmmas_in_flight(ptx))
    if row["mma"] == "wgmma":
        row["wgmma_serialized"] = serialized
    return row


# ---------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------

def selected(launches: list[Launch], kernel: str | None, weight_dtype: str | None) -> list[Launch]:
    """The launches of one kernel and one weight dtype (torch's name); None selects all."""
    return [ln for ln in launches
            if kernel in (None, ln.kernel) and weight_dtype in (None, str(ln.weight_dtype).removeprefix("torch."))]


def planned_builds(launches: list[Launch], quick: bool) -> Iterator[tuple[Launch, triton.Config, bool]]:
    """(launch, config, kept) to build: every candidate; with quick, per kernel and weight dtype only the
    kept build closest to the card's limits: the most shared memory, then the most accumulators per thread
    (among equals the first launch: bf16 adapters, the smallest rank)."""
    if not quick:
        for launch in launches:
            kept = launch.kept()
            for config in launch.candidates():
                yield launch, config, any(config is k for k in kept)
        return
    families: dict[tuple, tuple[Launch, triton.Config]] = {}
    for launch in launches:
        for config in launch.kept():
            family = (launch.kernel, launch.weight_dtype)
            best = families.get(family)
            if best is None or _pressure(launch, config) > _pressure(*best):
                families[family] = (launch, config)
    for launch, config in families.values():
        yield launch, config, True


def _pressure(launch: Launch, config: triton.Config) -> tuple[int, int]:
    accumulators = T.accumulators_per_thread(config) if launch.is_gemm else 0
    return _smem_estimate(launch, config), accumulators


def _smem_estimate(launch: Launch, config: triton.Config) -> int:
    """The pruning's estimate of the build's shared memory."""
    named, arch = launch.named_args, launch.target.arch
    if launch.is_gemm:
        return T.gemm_smem_bytes(config, arch, launch.kwargs["BLOCK_R"], named["x_ptr"].dtype, named["w_ptr"].dtype,
                                 launch.kwargs["W_SCALE"])
    return T.shrink_smem_bytes(config, arch, launch.kwargs["BLOCK_R"], named["x_ptr"].dtype, named["a_ptr"].dtype)


def problems(rows: list[dict]) -> list[str]:
    """Why the kept builds are not fit to launch: failed, spilled or over the card's shared memory."""
    out = []
    for row in rows:
        if not row["kept"]:
            continue
        where = _where(row)
        if not row["ok"]:
            out.append(f"{where}: does not compile: {row['error']}")
        elif row["spill_bytes"]:
            out.append(f"{where}: spills {row['spill_bytes']} bytes")
        elif row["shared_bytes"] > row["smem_limit"]:
            out.append(f"{where}: needs {row['shared_bytes']} B of shared memory, the card has {row['smem_limit']}")
    return out


def serial_wgmma(row: dict) -> list[str]:
    """--require-wgmma-in-flight: a kept wgmma build whose main loop waits for each wgmma before it
    prepares the next tiles (as a loop that converts a tile into shared memory for wgmma does), or that
    ptxas serializes."""
    if not (row["kept"] and row["mma"] == "wgmma"):
        return []
    if row["wgmma_in_flight"] == 0:
        return [f"{_where(row)}: the main loop keeps no wgmma in flight (wgmma.wait_group 0)"]
    if row["wgmma_serialized"]:
        return [f"{_where(row)}: ptxas serializes the wgmmas (C7515)"]
    return []


def _where(row: dict) -> str:
    return f"sm_{row['arch']} {row['kernel']} {row['weight_dtype']} {_config_text(row['config'])}"


def model_notes(row: dict, estimate: int) -> list[str]:
    """Where the pruning's model disagrees with a build: its shared-memory estimate is not the build's, or
    it drops a config whose build compiles without spilling and fits the card."""
    if not row["ok"]:
        return []
    where = _where(row)
    notes = []
    if estimate != row["shared_bytes"]:
        notes.append(f"{where}: the pruning estimates {estimate} B of shared memory, the build needs {row['shared_bytes']}")
    if not row["kept"] and not row["spill_bytes"] and row["shared_bytes"] <= row["smem_limit"]:
        notes.append(f"{where}: pruned, though it compiles without spilling and fits the card")
    return notes


def tiles_kept(launches: list[Launch]) -> dict[tuple, tuple[int, int]]:
    """(arch, kernel, weight dtype) -> (distinct tiles the pruning keeps, distinct candidate tiles), over
    the launches' adapter dtypes and ranks: what --quick does not build, counted all the same."""
    counts: dict[tuple, tuple[set, set]] = {}
    for launch in launches:
        kept, candidates = counts.setdefault(
            (launch.target.arch, launch.kernel, str(launch.weight_dtype).removeprefix("torch.")), (set(), set()))
        kept.update(str(c) for c in launch.kept())
        candidates.update(str(c) for c in launch.candidates())
    return {group: (len(kept), len(candidates)) for group, (kept, candidates) in counts.items()}


def summary(rows: list[dict], tiles: dict[tuple, tuple[int, int]]) -> list[str]:
    """A markdown table, one line per card, kernel and weight dtype: the tiles the pruning keeps among the
    candidates (`tiles_kept`), the builds made and kept and how many of those compile, the kept builds'
    largest register count, spills and shared memory, and the fewest wgmma groups their main loops keep in
    flight ("serialized" where ptxas serializes one)."""
    lines = ["| card | kernel | weight | tiles kept | builds kept | kept ok | registers | spill bytes "
             "| shared bytes / limit | mma | wgmma in flight |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["arch"], row["kernel"], row["weight_dtype"]), []).append(row)
    for (arch, kernel, weight), group in groups.items():
        kept = [r for r in group if r["kept"]]
        built = [r for r in kept if r["ok"]]
        most = lambda key: max((r[key] for r in built), default="-")
        mma = ", ".join(sorted({r["mma"] for r in built})) or "-"
        loops = [r for r in built if r["wgmma_in_flight"] is not None]
        in_flight = str(min(r["wgmma_in_flight"] for r in loops)) if loops else "-"
        in_flight += " serialized" if any(r["wgmma_serialized"] for r in loops) else ""
        tiles_in, tiles_of = tiles[arch, kernel, weight]
        lines.append(f"| sm_{arch} | {kernel} | {weight} | {tiles_in} / {tiles_of} | {len(kept)} / {len(group)} "
                     f"| {len(built)} | {most('registers')} | {most('spill_bytes')} "
                     f"| {most('shared_bytes')} / {group[0]['smem_limit']} | {mma} | {in_flight} |")
    return lines


def _tile_text(config: dict) -> str:
    tile = "x".join(str(config[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D") if k in config)
    return f"{tile} w{config['num_warps']} s{config['num_stages']}"


def _config_text(config: dict) -> str:
    rank = f" K*r={config['stacked_rank']} {config['adapter_dtype']}" if config["stacked_rank"] else ""
    return _tile_text(config) + rank


def _print_row(row: dict) -> None:
    status = "ok" if row["ok"] else "FAILED"
    print(f"sm_{row['arch']} {row['kernel']:<18} {row['weight_dtype']:<13} {_config_text(row['config']):<36} "
          f"{'kept' if row['kept'] else 'pruned':<6} {status:<6} regs {row['registers']} spill {row['spill_bytes']} "
          f"smem {row['shared_bytes']}/{row['smem_limit']} {row['mma']}{_in_flight_text(row)}", flush=True)


def _in_flight_text(row: dict) -> str:
    if row["wgmma_in_flight"] is None:
        return ""
    return f" in flight {row['wgmma_in_flight']}" + (" serialized" if row["wgmma_serialized"] else "")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", required=True, metavar="CC",
                        help=f"compute capabilities to build for, from {sorted(T.SMEM_LIMITS)}")
    parser.add_argument("--quick", action="store_true", help="one build per kernel, weight dtype and arch")
    parser.add_argument("--kernel", choices=KERNELS, help="only this kernel (all its candidate configs)")
    parser.add_argument("--weight-dtype", help="only this weight dtype, torch's name (bfloat16, float8_e4m3fn, "
                                               "float32 for the shrinks' fp32 adapters)")
    parser.add_argument("--json", type=Path, required=True, metavar="FILE", help="where to write the builds")
    parser.add_argument("--require-wgmma-in-flight", action="store_true",
                        help="also fail on a kept wgmma build whose main loop waits for each wgmma (PTX) or "
                             "that ptxas serializes")
    args = parser.parse_args(argv)
    unknown = [a for a in args.arch if a not in T.SMEM_LIMITS]
    if unknown:
        parser.error(f"--arch {unknown[0]}: no known shared-memory limit; choose from {sorted(T.SMEM_LIMITS)}")
    names = {str(d).removeprefix("torch.") for d in WEIGHT_DTYPES + ADAPTER_DTYPES}
    if args.weight_dtype is not None and args.weight_dtype not in names:
        parser.error(f"--weight-dtype {args.weight_dtype}: expected one of {sorted(names)}")
    if not args.json.parent.is_dir():
        parser.error(f"--json {args.json}: folder {args.json.parent} does not exist")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if T.INTERPRET:
        raise SystemExit("aot_builds: slideredit.kernels was imported with TRITON_INTERPRET=1; run this script "
                         "directly (it unsets the variable) to build for GPUs")
    rows, notes, serial, tiles = [], [], [], {}
    for arch in args.arch:
        launches = selected(flux_launches(arch), args.kernel, args.weight_dtype)
        tiles.update(tiles_kept(launches))
        for launch, config, kept in planned_builds(launches, args.quick):
            row = build(launch, config, kept)
            rows.append(row)
            notes += model_notes(row, _smem_estimate(launch, config))
            serial += serial_wgmma(row) if args.require_wgmma_in_flight else []
            _print_row(row)
    args.json.write_text(json.dumps(rows, indent=1) + "\n")
    for line in notes:
        print(f"aot_builds: note: {line}", file=sys.stderr)
    bad = problems(rows) + serial
    for line in bad:
        print(f"aot_builds: {line}", file=sys.stderr)
    print("\n".join(["", *summary(rows, tiles), ""]))
    print(f"{len(rows)} builds, {sum(r['kept'] for r in rows)} kept, {len(bad)} kept builds unfit; wrote {args.json}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
