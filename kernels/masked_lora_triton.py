"""Triton kernels for the masked multi-slider LoRA linear.

    Y = X W^T + b + H~ B^T,   H~ = S (x) (X A^T)   (column group k of X A^T scaled by S[:, k])

X: (M, D) tokens, W: (N, D), A: (K*r, D) and B: (N, K*r) hold the K adapters stacked along the rank,
S: (M, K) per-token scales (0 = adapter off for that token).

Structure: two launches, whatever K is; `masked_lora` runs them, with the arguments of the PyTorch path
(masked_lora.py's `_torch_masked_lora`), the forward and, on transposed operands, the backward.
  1. `scaled_shrink`: H~ = S (x) (X A^T) in fp32, (M, K*r). One program per BLOCK_M rows holds the whole
     stacked rank (K*r <= 128) and streams X once. Row tiles whose scales are all zero skip the loop
     (X and A are never read) and store zeros.
  2. `fused_linear`: one GEMM whose fp32 accumulator starts from H~ B^T (skipped for all-zero row tiles,
     so B is never read there), then runs the usual loop over X W^T, adds the bias and stores Y once.
     No read-modify-write of Y, no pass per adapter. With fp8 weights the loop comes first, then the
     per-row scales, then H~ B^T (unscaled). Without adapters (HAS_LORA off) it is a plain (fp8) linear.

Why not recompute the shrink inside the GEMM (one launch)? Each output tile would redo its rows' shrink:
BLOCK_M x K*r x D extra tensor-core work next to the tile's BLOCK_M x BLOCK_N x D, i.e. K*r / BLOCK_N
more work in the main loop (+12.5% at K*r = 16, +50% at K*r = 64 with BLOCK_N = 128), plus a second fp32
accumulator live across the pipelined loop. The separate shrink is memory-bound (K*r <= 128 FLOP per
byte of X, below the H100's ~295 FLOP/byte ridge): it re-reads X once, ~16 us for 8704 x 3072 bf16 at
3.35 TB/s, against ~170-240 us for the 8704 x 3072 x 3072 base GEMM (7-10%), ~2.5% at d_out = 12288,
and flat in K. Recomputation comes closest at K*r = 16, d_out = 3072 (+12.5% against +7-10%) and loses
everywhere else; and for STLoRA text tokens (a handful of the 512 rows selected) the shrink skips almost
all of X. The expand prologue adds K*r / D of the main loop's work (<= 4% at K*r = 128, D = 3072).
These are bounds from the reference numbers, not measurements: timings are pending a GPU run of
benchmarks/bench_lora.py (the kernels were compiled for sm_90 here, but never run on a GPU).

Precision: dot operands are x's dtype (adapters of any dtype are cast tile by tile on load), accumulation
is fp32, H~ stays fp32 until it is rounded to x's dtype for the expand dot. fp32 inputs use IEEE fp32 dots
unless torch allows TF32 matmuls (torch.backends.cuda.matmul.allow_tf32). fp8 (float8_e4m3fn) weight
tiles are converted to x's dtype in the main loop (exact: e4m3 has 3 mantissa bits); in dX = dY W, where
the row scale runs along the reduction, each tile is dequantized (times its scales, rounded to x's dtype).
From sm_89 on the tiles load as fp8 and convert in hardware; below (A100, RTX 30xx, A10: Triton has no
fp8e4nv there) they load as bytes, decoded exactly to value / 256 in fp16, the 256 going into the scales:
the same results (`reads_fp8_as_bytes`, `_e4m3_bytes_to_fp16`). On sm_90 the fp8 GEMM computes
acc^T = W X^T, so that the converted W tile is wgmma's register operand and one wgmma stays in flight
while the next tile converts (`swaps_ab`).

Autotuning: the key holds every build flag and M's power-of-two bucket; configs whose builds would not
fit the device's shared memory or would spill registers are pruned before they are compiled (the
estimates are checked against real builds for sm_80-sm_90: benchmarks/aot_builds.py); IEEE fp32 dots
get small FMA tiles (the dispatch sends fp32 to PyTorch unless Triton is forced); results are cached on
disk by Triton where it supports `cache_results` (Triton >= 3.3; ~/.triton/cache).

Under TRITON_INTERPRET=1 (CPU, NumPy) bfloat16 `tl.dot` is wrong, so bf16 operands are upcast to fp32
there (the UPCAST flag); on a GPU the dots stay bf16. The interpreter also gets a single autotune config.
"""
import functools
import inspect
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .dispatch import m_bucket  # the autotune key's token count: one tuning per power of two

# Read once, like triton.jit does when it decides to build interpreted kernels.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The GEMM's W_SCALE build flag: how it applies an fp8 weight's fp32 scales. tl.constexpr globals, so the
# kernel compares W_SCALE against these names and is still built (and autotuned) once per value.
W_SCALE_NONE = tl.constexpr(0)  # weight in x's dtype, no scales
W_SCALE_OUTPUTS = tl.constexpr(1)  # W (N, D), one scale per row = per output column: on the base accumulator
W_SCALE_REDUCTION = tl.constexpr(2)  # W^T in dX = dY W: the scales run along the reduction, per W tile

# Tensor-core (mma / wgmma) tiles: bf16, fp16 and TF32 dots.
GPU_SHRINK_CONFIGS = [
    triton.Config({"BLOCK_M": 32, "BLOCK_D": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_D": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_D": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
]
GPU_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_D": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_D": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
]
# IEEE fp32 dots run on the FMA units with the whole accumulator in registers: the tensor-core tiles
# above need 128-256 accumulator registers per thread there and spill 45-125 KB per thread (60-155 s of
# ptxas each). This tile keeps 32 accumulators per thread; its sm_90 builds use 128 registers without
# spilling up to K*r = 64 (6-12 s each), and spill 580 B at K*r = 128 (a 32 x 64 tile spilled already
# at K*r = 64). The dispatch sends fp32 to PyTorch anyway; this serves backend="triton" when forced.
FMA_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 32, "GROUP_M": 8}, num_warps=4, num_stages=2),
]

if INTERPRET:
    # One config (autotune with several fails on CPU-only torch), large blocks (cost is per instance).
    _SHRINK_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_D": 32})]
    _GEMM_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_D": 32, "GROUP_M": 2})]
else:
    _SHRINK_CONFIGS = GPU_SHRINK_CONFIGS
    _GEMM_CONFIGS = GPU_GEMM_CONFIGS + FMA_GEMM_CONFIGS

# Triton >= 3.3 can keep autotune results on disk (in its cache dir, keyed by the tuning key, the configs,
# the kernel's source and the target); older versions tune once per process.
_DISK_CACHE = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


# Shared memory one block may opt in to, by compute capability (sm_86 -> 86), in bytes: what Triton's
# launcher checks a build against (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SMEM_LIMITS = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
# Where torch does not report the limit (ROCm, some older builds) and the card is not in the table:
# 64 KB, what any GPU Triton builds for gives one block (AMD's LDS, NVIDIA's sm_75).
CONSERVATIVE_SMEM_LIMIT = 65_536


@dataclass(frozen=True)
class GpuTarget:
    """What the pruning needs to know about a card: its compute capability (86 for sm_86; None when
    unknown: then every estimate takes its larger case) and the shared memory one block may opt in to."""

    arch: int | None
    smem_limit: int


def device_target(device: torch.device) -> GpuTarget:
    """The card behind `device`; off CUDA (the interpreter, which never prunes) an unknown, small one."""
    if device.type != "cuda":
        return GpuTarget(None, CONSERVATIVE_SMEM_LIMIT)
    return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_target(index: int) -> GpuTarget:
    props = torch.cuda.get_device_properties(index)
    arch = None if torch.version.hip else props.major * 10 + props.minor  # ROCm's "major" is not an sm_
    limit = getattr(props, "shared_memory_per_block_optin", None) or SMEM_LIMITS.get(arch, CONSERVATIVE_SMEM_LIMIT)
    return GpuTarget(arch, limit)


# Shared-memory estimates. They equal Triton 3.9's allocation for every build benchmarks/aot_builds.py
# makes (the FLUX grid on sm_80, sm_86, sm_89 and sm_90: bf16 and fp8 weights, bf16 and fp32 adapters).
# The software-pipelined main loop keeps, for each tile it loads:
#   - with mma.sync (sm_80 to sm_89; sm_90 dots of fewer than 64 rows): num_stages - 1 buffers, in the
#     dtype the tile is loaded in; conversions (fp8 W, fp32 adapters) happen in registers;
#   - with wgmma (sm_90): num_stages buffers when the dot reads the tile as it was loaded; a tile that
#     is converted first goes through registers: num_stages - 1 buffers as loaded, plus one converted
#     tile in the dot's dtype, from which wgmma reads (the shrink's fp32 adapters); a converted tile that
#     wgmma reads from registers (the fp8 W of the GEMM, which swaps its operands there: `swaps_ab`)
#     keeps only the num_stages - 1 buffers as loaded;
#   - a load that feeds no dot (the dX's fp8 weight scales): num_stages - 1 buffers.
# The GEMM's low-rank tiles are loaded outside the loop and reuse that memory. A card not measured gets
# the wgmma case, the larger. Examples (bf16 x): the 128 x 256 x 64, 3-stage GEMM takes 147,456 B on
# sm_90 and 98,304 B on sm_8x with bf16 W; 81,920 B and 65,536 B with fp8 W.

def uses_wgmma(arch: int | None, block_m: int) -> bool:
    """Whether a dot of block_m rows is estimated as wgmma on `arch` (see above)."""
    measured_mma_sync = arch is not None and (80 <= arch < 90 or (arch == 90 and block_m % 64 != 0))
    return not measured_mma_sync


def swaps_ab(arch: int | None, w_scale: int) -> bool:
    """Whether the GEMM computes acc^T = W X^T (its SWAP_AB flag): on sm_90, where an fp8 W is converted
    for wgmma. wgmma reads its second operand from shared memory only, and its first from registers too:
    W second, the converted tile goes through one shared buffer, and Triton waits for each wgmma before
    it converts the next (wgmma.wait_group 0); W first, it stays in registers and one wgmma stays in
    flight (wait_group 1), as in the bf16 loop. Measured on sm_90 only (benchmarks/aot_builds.py)."""
    return arch == 90 and w_scale != W_SCALE_NONE.value


def loop_runs(arch: int | None, reduction: int) -> bool:
    """The GEMM's LOOP_RUNS flag: the kernel tells the compiler that its main loop runs at least once, on
    sm_90. Where the loop might be skipped, that path sets the accumulator outside wgmma, and ptxas
    serializes the loop's wgmmas (its message C7515; the SASS then waits for each wgmma whatever the PTX's
    wgmma.wait_group says: 33 of the 40 sm_90 bf16 GEMM builds did). Not promised on other cards, where
    the builds do not need it (and ptxas spills differently with it)."""
    return arch == 90 and reduction > 0


def _tile_buffers(stages: int, elements: int, loaded: torch.dtype, dot: torch.dtype, wgmma: bool) -> int:
    """Bytes of shared memory for one tile of a pipelined dot operand read from shared memory (the rules
    above; a register operand takes the mma.sync case)."""
    if not wgmma:
        return (stages - 1) * elements * loaded.itemsize
    if loaded == dot:
        return stages * elements * loaded.itemsize
    return (stages - 1) * elements * loaded.itemsize + elements * dot.itemsize


def shrink_smem_bytes(config: triton.Config, arch: int | None, block_r: int, x_dtype: torch.dtype,
                      a_dtype: torch.dtype) -> int:
    bm, bd = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_D"]
    wgmma = uses_wgmma(arch, bm)
    return (_tile_buffers(config.num_stages, bm * bd, x_dtype, x_dtype, wgmma)
            + _tile_buffers(config.num_stages, bd * block_r, a_dtype, x_dtype, wgmma))


def gemm_smem_bytes(config: triton.Config, arch: int | None, block_r: int, x_dtype: torch.dtype,
                    w_dtype: torch.dtype, w_scale: int = W_SCALE_NONE.value) -> int:
    bm, bn, bd = (config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D"))
    stages, wgmma = config.num_stages, uses_wgmma(arch, bm)
    w_in_registers = swaps_ab(arch, w_scale)
    main_loop = (_tile_buffers(stages, bm * bd, x_dtype, x_dtype, wgmma)
                 + _tile_buffers(stages, bd * bn, w_dtype, x_dtype, wgmma and not w_in_registers))
    if w_scale == W_SCALE_REDUCTION.value:  # fp32 scales of each W tile, loaded beside it
        main_loop += (stages - 1) * bd * torch.float32.itemsize
    low_rank = (bm * block_r + block_r * bn) * x_dtype.itemsize  # H~ and B^T tiles, in the dot dtype
    return max(main_loop, low_rank)


def accumulators_per_thread(config: triton.Config) -> int:
    return config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] // (32 * config.num_warps)


# Which GEMM builds spill registers, as measured (benchmarks/aot_builds.py: Triton 3.9's ptxas, the FLUX
# grid at K*r = 16 and 32 on every card, plus the fp8 forward and dX at K*r = 64 and 128). No register
# count predicts it: tiles of the same count spill or not depending on their shape, on the card and on
# ptxas' scheduling (sm_8x builds at 250-255 registers spill and others do not; one sm_89 build spills
# at 168). So the pruning reads the measurements: per card and fp8 build kind, the smallest BLOCK_R
# (16-128) from which a tile (BLOCK_M, BLOCK_N, num_warps) spilled with either adapter dtype. Tiles
# and kinds not listed never spilled: bf16 weights (up to K*r = 32) and fp8_linear's forward.
#   - fp8 forward: the low-rank tiles come after the loop, beside the whole accumulator;
#   - fp8 dX: each W tile is dequantized in fp32 registers (no sm_90 build spills).
_FP8_FORWARD, _FP8_DX, _FP8_LINEAR_DX = "fp8 forward", "fp8 dX", "fp8_linear dX"
_MMA_SYNC_FP8_FORWARD = {(128, 256, 8): 64, (128, 128, 4): 64, (64, 128, 4): 64, (128, 128, 8): 128,
                         (128, 64, 4): 128}
_MMA_SYNC_FP8_DX = {(128, 256, 8): 16, (128, 128, 4): 16, (128, 128, 8): 128, (64, 128, 4): 128, (128, 64, 4): 128}
SPILLS_FROM = {
    # sm_80 and sm_86 keep the 4-warp 128 x 128 dX tile at 250-255 registers without spilling (sm_86: only
    # without adapters), sm_89 spills 104 B there
    80: {_FP8_FORWARD: _MMA_SYNC_FP8_FORWARD, _FP8_DX: {**_MMA_SYNC_FP8_DX, (128, 128, 4): 128},
         _FP8_LINEAR_DX: {(128, 256, 8): 16}},
    86: {_FP8_FORWARD: _MMA_SYNC_FP8_FORWARD, _FP8_DX: _MMA_SYNC_FP8_DX, _FP8_LINEAR_DX: {(128, 256, 8): 16}},
    89: {_FP8_FORWARD: _MMA_SYNC_FP8_FORWARD, _FP8_DX: _MMA_SYNC_FP8_DX,
         _FP8_LINEAR_DX: {(128, 256, 8): 16, (128, 128, 4): 16}},
    90: {_FP8_FORWARD: {(128, 256, 8): 128, (128, 128, 4): 128}},
}
# And single builds below those ranks, one adapter dtype only: ptxas keeps one 4-byte value on the stack
# across the main loop (stored before it, loaded at the call it makes for the low-rank branch after it).
# (card, kind, tile, BLOCK_R, adapter dtype)
SPILLING_BUILDS = {
    (80, _FP8_FORWARD, (128, 128, 4), 32, torch.bfloat16),  # 255 registers
    (89, _FP8_FORWARD, (128, 64, 4), 16, torch.bfloat16),  # 168 registers
}


def _build_kind(w_scale: int, has_lora: bool) -> str | None:
    if w_scale == W_SCALE_OUTPUTS.value:
        return _FP8_FORWARD if has_lora else None  # fp8_linear's forward never spilled
    if w_scale == W_SCALE_REDUCTION.value:
        return _FP8_DX if has_lora else _FP8_LINEAR_DX
    return None


def gemm_spills(config: triton.Config, arch: int | None, w_scale: int, has_lora: bool, block_r: int,
                adapter_dtype: torch.dtype | None = None) -> bool:
    """Whether the GEMM's build spills registers on sm_`arch` (SPILLS_FROM, SPILLING_BUILDS). A card not
    measured (None, or not in the table) drops every build that spills on some measured card; so does an
    adapter dtype of None for the single builds."""
    kind = _build_kind(w_scale, has_lora)
    if kind is None:
        return False
    if arch not in SPILLS_FROM:
        return any(gemm_spills(config, card, w_scale, has_lora, block_r, adapter_dtype) for card in SPILLS_FROM)
    tile = (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps)
    spills_from = SPILLS_FROM[arch].get(kind, {}).get(tile)
    if spills_from is not None and block_r >= spills_from:
        return True
    dtypes = [adapter_dtype] if adapter_dtype is not None else [torch.bfloat16, torch.float32]
    return any((arch, kind, tile, block_r, dtype) in SPILLING_BUILDS for dtype in dtypes)


def _fitting(configs: list, size, limit: int) -> list:
    """Configs whose estimate fits `limit`; if none does, the smallest (its build fails, and the caller's
    dispatch falls back to PyTorch), since the autotuner needs at least one."""
    fits = [c for c in configs if size(c) <= limit]
    return fits or [min(configs, key=size)]


def keep_shrink_configs(configs, named_args, target: GpuTarget, **kwargs) -> list:
    """The shrink kernel's configs that fit `target`'s shared memory (named_args: the kernel's arguments by
    name, tensors or stand-ins with their dtypes; kwargs: its keyword arguments, as early_config_prune
    gets them)."""
    x, a = named_args["x_ptr"], named_args["a_ptr"]
    size = lambda c: shrink_smem_bytes(c, target.arch, kwargs["BLOCK_R"], x.dtype, a.dtype)
    return _fitting(list(configs), size, target.smem_limit)


def prune_shrink_configs(configs, named_args, **kwargs) -> list:
    """early_config_prune for the shrink kernel: keep_shrink_configs on the card x lives on."""
    return keep_shrink_configs(configs, named_args, device_target(named_args["x_ptr"].device), **kwargs)


def gemm_family(configs, x_dtype: torch.dtype, input_precision: str) -> list:
    """The GEMM configs the pruning chooses among: the FMA tiles for IEEE fp32 dots, the tensor-core tiles
    otherwise."""
    fma = input_precision == "ieee" and x_dtype == torch.float32
    return [c for c in configs if any(c is f for f in FMA_GEMM_CONFIGS) == fma] or list(configs)


def keep_gemm_configs(configs, named_args, target: GpuTarget, **kwargs) -> list:
    """The GEMM's configs for `target` (arguments as keep_shrink_configs): its family, less those whose
    build spills or cannot fit shared memory."""
    x, w = named_args["x_ptr"], named_args["w_ptr"]
    w_scale, block_r = kwargs.get("W_SCALE", W_SCALE_NONE.value), kwargs["BLOCK_R"]
    has_lora = kwargs.get("HAS_LORA", False)
    adapter_dtype = named_args["b_ptr"].dtype if has_lora else None  # B (forward) or A^T (dX)
    family = gemm_family(configs, x.dtype, kwargs["INPUT_PRECISION"])
    family = [c for c in family if not gemm_spills(c, target.arch, w_scale, has_lora, block_r, adapter_dtype)
              ] or family
    size = lambda c: gemm_smem_bytes(c, target.arch, block_r, x.dtype, w.dtype, w_scale)
    return _fitting(family, size, target.smem_limit)


def prune_gemm_configs(configs, named_args, **kwargs) -> list:
    """early_config_prune for the GEMM: keep_gemm_configs on the card x lives on."""
    return keep_gemm_configs(configs, named_args, device_target(named_args["x_ptr"].device), **kwargs)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every kernel output is allocated here (tests poison it with NaN to prove each element is written)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _load_scales(s_ptr, offs_m, offs_j, M, KR, R, stride_sm, stride_sk):
    """(BLOCK_M, BLOCK_R) fp32 tile of S expanded to the stacked rank: column j scales adapter j // R."""
    mask = (offs_m[:, None] < M) & (offs_j[None, :] < KR)
    ptrs = s_ptr + offs_m[:, None] * stride_sm + (offs_j // R)[None, :] * stride_sk
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


# Autotune keys: every argument that changes the build or the best tiles (the autotuner adds the tensors'
# dtypes): M only as its power-of-two bucket, strides of 1 (Triton specialises on them) via the layout.
@triton.autotune(
    configs=_SHRINK_CONFIGS, key=["M_BUCKET", "D", "BLOCK_R", "stride_xd", "stride_ad", "UPCAST", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": prune_shrink_configs}, **_DISK_CACHE,
)
@triton.jit(do_not_specialize=["M_BUCKET"])
def _scaled_shrink_kernel(
    x_ptr, a_ptr, s_ptr, h_ptr,
    M, M_BUCKET, D, KR, R,
    stride_xm, stride_xd, stride_aj, stride_ad, stride_sm, stride_sk, stride_hm, stride_hj,
    BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    scale = _load_scales(s_ptr, offs_m, offs_j, M, KR, R, stride_sm, stride_sk)

    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if tl.sum((scale != 0).to(tl.int32)) > 0:  # all-zero row tile: X and A are never read
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_d[None, :] * stride_xd
        a_ptrs = a_ptr + offs_j[None, :] * stride_aj + offs_d[:, None] * stride_ad  # A^T tile (BLOCK_D, BLOCK_R)
        for d0 in range(0, D, BLOCK_D):
            d_ok = offs_d < D - d0
            x = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & d_ok[None, :], other=0.0)
            a = tl.load(a_ptrs, mask=d_ok[:, None] & (offs_j[None, :] < KR), other=0.0).to(x_ptr.dtype.element_ty)
            if UPCAST:
                x = x.to(tl.float32)
                a = a.to(tl.float32)
            h = tl.dot(x, a, h, input_precision=INPUT_PRECISION)
            x_ptrs += BLOCK_D * stride_xd
            a_ptrs += BLOCK_D * stride_ad
    # A zero scale is a hard mask: 0 * inf or 0 * NaN from the adapter still gives 0.
    h = tl.where(scale != 0, h * scale, 0.0)

    h_ptrs = h_ptr + offs_m[:, None] * stride_hm + offs_j[None, :] * stride_hj
    tl.store(h_ptrs, h, mask=(offs_m[:, None] < M) & (offs_j[None, :] < KR))


@triton.jit
def _e4m3_bytes_to_fp16(b):
    """float8_e4m3fn codes as uint8 -> fp16 holding the e4m3 value / 256, exact for every finite code.

    (b + (b & 0x80)) << 7 puts e4m3's sign bit on fp16's, its 4 exponent bits on the low 4 of fp16's 5 and
    its 3 mantissa bits on the top of fp16's 10 (the same bits as ((b & 0x80) << 8) | ((b & 0x7F) << 7),
    in one operation fewer). fp16's exponent bias is e4m3's plus 8 and both have subnormals at the same
    place, so every code reads as its value times 2^-8. Plain integer operations build on every card;
    Triton takes fp8e4nv (float8_e4m3fn) tensors only from sm_89. The NaN codes 0x7F and 0xFF read as
    +-1.875 (NaN / 256 would be NaN): the loaders refuse NaN weights (quantization.write_fp8_rows)."""
    b = b.to(tl.uint16)
    return ((b + (b & 0x80)) << 7).to(tl.float16, bitcast=True)


@triton.jit
def _weight_scales(ws_ptr, offs, mask, w_ptr):
    """fp8 row scales at offs, times 256 where the weight arrives as bytes (decoded to its value / 256)."""
    ws = tl.load(ws_ptr + offs, mask=mask, other=0.0)
    if w_ptr.dtype.element_ty == tl.uint8:
        ws *= 256.0
    return ws


@triton.jit
def _along_d(v, SWAP_AB: tl.constexpr):
    """A vector along the reduction (BLOCK_D), broadcast against the GEMM's W tile: W^T's rows, or W's
    columns when the GEMM swaps its operands."""
    if SWAP_AB:
        out = v[None, :]
    else:
        out = v[:, None]
    return out


@triton.jit
def _add_low_rank(acc, x_ptr, h_ptr, b_ptr, s_ptr, offs_m, offs_n, M, N, KR, R,
                  stride_hm, stride_hj, stride_bn, stride_bj, stride_sm, stride_sk,
                  BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + H~ B^T for one (BLOCK_M, BLOCK_N) tile; skipped (B never read) where the row tile's scales are all 0."""
    offs_j = tl.arange(0, BLOCK_R)
    scale = _load_scales(s_ptr, offs_m, offs_j, M, KR, R, stride_sm, stride_sk)
    if tl.sum((scale != 0).to(tl.int32)) > 0:
        m_ok, n_ok, j_ok = offs_m < M, offs_n < N, offs_j < KR
        h = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_j[None, :] * stride_hj,
                    mask=m_ok[:, None] & j_ok[None, :], other=0.0)
        bt = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_j[:, None] * stride_bj,  # B^T (BLOCK_R, BLOCK_N)
                     mask=j_ok[:, None] & n_ok[None, :], other=0.0)
        h = h.to(x_ptr.dtype.element_ty)  # rounded once to the dot dtype, like X
        bt = bt.to(x_ptr.dtype.element_ty)
        if UPCAST:
            h = h.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(h, bt, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.autotune(
    configs=_GEMM_CONFIGS,
    key=["M_BUCKET", "N", "D", "BLOCK_R", "stride_xd", "stride_wd", "HAS_BIAS", "HAS_LORA", "W_SCALE", "SWAP_AB",
         "LOOP_RUNS", "UPCAST", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": prune_gemm_configs}, **_DISK_CACHE,
)
@triton.heuristics({"EVEN_D": lambda args: args["D"] % args["BLOCK_D"] == 0})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _fused_linear_kernel(
    x_ptr, w_ptr, ws_ptr, bias_ptr, h_ptr, b_ptr, s_ptr, y_ptr,
    M, M_BUCKET, N, D, KR, R,
    stride_xm, stride_xd, stride_wn, stride_wd, stride_hm, stride_hj, stride_bn, stride_bj,
    stride_sm, stride_sk, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, W_SCALE: tl.constexpr, SWAP_AB: tl.constexpr,
    LOOP_RUNS: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    # Grouped ordering: GROUP_M row tiles sweep the columns together, so their X rows and W columns
    # stay in L2 while they are reused.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_size_m
    pid_n = (pid % pids_per_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < M
    n_ok = offs_n < N

    # The low-rank term H~ B^T goes into the accumulator first, before the loop's pointer tiles exist,
    # so its tiles are dead by the time the pipelined loop runs (after the loop, or beside those
    # pointers, sm_90 builds of the 128 x 256 and the 4-warp 128 x 128 tiles spill at K*r = 128). With an
    # fp8 row scale it must come after the loop, since the scale multiplies the base term only.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LORA:
        if W_SCALE != W_SCALE_OUTPUTS:
            acc = _add_low_rank(acc, x_ptr, h_ptr, b_ptr, s_ptr, offs_m, offs_n, M, N, KR, R,
                                stride_hm, stride_hj, stride_bn, stride_bj, stride_sm, stride_sk,
                                BLOCK_R, UPCAST, INPUT_PRECISION)

    # Rows / columns past the edge wrap onto valid ones for the loads (no M, N masks in the loop); only
    # the store is masked. The hints keep the loads vectorised, as in Triton's matmul tutorial: a lane past
    # the edge feeds only outputs the store drops, and a vector's width divides the row stride, so it
    # stays inside its row.
    offs_m_ld = tl.max_contiguous(tl.multiple_of(offs_m % M, BLOCK_M), BLOCK_M)
    offs_n_ld = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N)
    x_ptrs = x_ptr + offs_m_ld[:, None] * stride_xm + offs_d[None, :] * stride_xd
    if SWAP_AB:  # the loop accumulates acc^T = W X^T (swaps_ab), from W's tiles (BLOCK_N, BLOCK_D)
        w_ptrs = w_ptr + offs_n_ld[:, None] * stride_wn + offs_d[None, :] * stride_wd
        acc = tl.trans(acc)
    else:  # acc += X W^T, from W^T's tiles (BLOCK_D, BLOCK_N)
        w_ptrs = w_ptr + offs_n_ld[None, :] * stride_wn + offs_d[:, None] * stride_wd
    if LOOP_RUNS:  # the launcher's promise (`loop_runs`)
        tl.assume(D > 0)
    for d0 in range(0, D, BLOCK_D):
        if EVEN_D:  # no masks: lets Triton software-pipeline the loads of a K-major W (nn.Linear's layout)
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            d_ok = offs_d < D - d0
            x = tl.load(x_ptrs, mask=d_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=_along_d(d_ok, SWAP_AB), other=0.0)
        if w_ptr.dtype.element_ty == tl.uint8:  # fp8 as bytes (cards below sm_89): value / 256 in fp16
            w = _e4m3_bytes_to_fp16(w)
        if W_SCALE == W_SCALE_REDUCTION:  # fp8 W^T in dX = dY W: dequantize the tile along the reduction
            ws = _weight_scales(ws_ptr + d0, offs_d, offs_d < D - d0, w_ptr)
            w = w.to(tl.float32) * _along_d(ws, SWAP_AB)
        w = w.to(x_ptr.dtype.element_ty)  # fp8 -> x's dtype is exact; a no-op for x's own dtype
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        if SWAP_AB:
            acc = tl.dot(w, tl.trans(x), acc, input_precision=INPUT_PRECISION)
        else:
            acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_D * stride_xd
        w_ptrs += BLOCK_D * stride_wd
    if SWAP_AB:
        acc = tl.trans(acc)
    if W_SCALE == W_SCALE_OUTPUTS:  # fp8 W: one scale per row of W, i.e. per column of Y, on the base term only
        acc *= _weight_scales(ws_ptr, offs_n, n_ok, w_ptr)[None, :]
        if HAS_LORA:  # then the slider term, unscaled
            acc = _add_low_rank(acc, x_ptr, h_ptr, b_ptr, s_ptr, offs_m, offs_n, M, N, KR, R,
                                stride_hm, stride_hj, stride_bn, stride_bj, stride_sm, stride_sk,
                                BLOCK_R, UPCAST, INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


NATIVE_FP8_ARCH = 89  # Triton takes fp8e4nv (float8_e4m3fn) tensors, converted in hardware, from sm_89 on


def reads_fp8_as_bytes(target: GpuTarget) -> bool:
    """Whether the GEMM gets an fp8 weight as its bytes and decodes them itself (`_e4m3_bytes_to_fp16`): on
    cards below sm_89 (A100, RTX 30xx, A10), where Triton refuses fp8e4nv. From sm_89 on, and off CUDA (the
    interpreter), it loads fp8 and converts with the hardware's instruction: about half the main loop's
    instructions of the decode in sm_89 and sm_90 builds, the same results."""
    return target.arch is not None and target.arch < NATIVE_FP8_ARCH


def _dot_flags(dtype: torch.dtype) -> dict:
    upcast = INTERPRET and dtype == torch.bfloat16
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return {"UPCAST": upcast, "INPUT_PRECISION": "tf32" if tf32 else "ieee"}


def _block_r(stacked_rank: int) -> int:
    return max(16, triton.next_power_of_2(stacked_rank))  # tl.dot needs every dimension >= 16


def masked_lora(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, scale: torch.Tensor | None, rank: int, *,
    weight_scale: torch.Tensor | None = None, weight_scale_dim: int = 0, need_y: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The Triton path, the twin of masked_lora.py's `_torch_masked_lora` (same arguments): (H~, Y) in two
    launches, H~ None without adapters, Y None if not need_y."""
    h = scaled_shrink(x, lora_a, scale, rank) if lora_a is not None else None
    if not need_y:
        return h, None
    return h, fused_linear(x, weight, bias, h, lora_b, scale, rank, weight_scale, weight_scale_dim)


def scaled_shrink(x: torch.Tensor, lora_a: torch.Tensor, scale: torch.Tensor, rank: int) -> torch.Tensor:
    """H~ = S (x) (X A^T) in fp32. x: (M, D); lora_a: (K*r, D), any strides; scale: (M, K) fp32."""
    M, D = x.shape
    KR = lora_a.shape[0]
    h = _empty((M, KR), torch.float32, x.device)
    if M == 0:
        return h
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)
    _scaled_shrink_kernel[grid](
        x, lora_a, scale, h,
        M, m_bucket(M), D, KR, rank,
        x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1),
        scale.stride(0), scale.stride(1), h.stride(0), h.stride(1),
        BLOCK_R=_block_r(KR), **_dot_flags(x.dtype),
    )
    return h


def fused_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    h: torch.Tensor | None, lora_b: torch.Tensor | None, scale: torch.Tensor | None, rank: int,
    weight_scale: torch.Tensor | None = None, weight_scale_dim: int = 0,
) -> torch.Tensor:
    """Y = X W^T + b + H~ B^T in x's dtype, written once.

    x: (M, D); weight: (N, D), x's dtype or float8_e4m3fn; bias: (N,) or None; h: (M, K*r) fp32;
    lora_b: (N, K*r); scale: (M, K); h, lora_b and scale all None for no adapters. weight_scale (fp32):
    W stands for weight * weight_scale along weight's dim `weight_scale_dim`: 0, one per row, applied to
    the base accumulator (W_SCALE_OUTPUTS); 1, one per reduction index, applied to each W tile as it is
    converted (W_SCALE_REDUCTION).
    Any strides: the backward passes transposed views (dX = dY W + G~ A).
    """
    M, D = x.shape
    N = weight.shape[0]
    has_lora = h is not None
    KR = h.shape[1] if has_lora else 0
    y = _empty((M, N), x.dtype, x.device)
    if M == 0 or N == 0:
        return y
    if not has_lora:  # placeholders, never read
        h, lora_b, scale, rank = y, y, y, 1
    w_scale, target = W_SCALE_NONE, device_target(x.device)
    if weight_scale is not None:
        w_scale = W_SCALE_OUTPUTS if weight_scale_dim == 0 else W_SCALE_REDUCTION
        if reads_fp8_as_bytes(target):
            weight = weight.view(torch.uint8)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _fused_linear_kernel[grid](
        x, weight, weight_scale if weight_scale is not None else y, bias if bias is not None else y,
        h, lora_b, scale, y,
        M, m_bucket(M), N, D, KR, rank,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), h.stride(0), h.stride(1),
        lora_b.stride(0), lora_b.stride(1), scale.stride(0), scale.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, HAS_LORA=has_lora, W_SCALE=w_scale.value,
        SWAP_AB=swaps_ab(target.arch, w_scale.value), LOOP_RUNS=loop_runs(target.arch, D), BLOCK_R=_block_r(KR),
        **_dot_flags(x.dtype),
    )
    return y
