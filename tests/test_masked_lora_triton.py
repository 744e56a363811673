"""kernels.masked_lora_triton's build decisions, as pure functions: config pruning and autotune keys.

The GPU config lists are pruned here for explicit cards (GpuTarget: compute capability and shared-memory
limit) with CPU stand-ins for the kernel arguments (the pruning reads only their dtypes). The byte
counts, registers and spills are those of real builds: `python benchmarks/aot_builds.py --arch 80 86 89 90
--json FILE` (Triton 3.9 on this CPU, the launcher's own specialisation at FLUX.1 Kontext's shapes;
tests/aot_builds/gemm_registers.json holds the GEMM builds' registers and spills).
"""
import inspect
import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import triton

from slideredit.kernels import masked_lora_triton as T

BF16, FP32, FP8 = torch.bfloat16, torch.float32, torch.float8_e4m3fn
CARDS = {arch: T.GpuTarget(arch, limit) for arch, limit in T.SMEM_LIMITS.items()}
H100, RTX4090, RTX3090, A100 = CARDS[90], CARDS[89], CARDS[86], CARDS[80]
OUTPUTS, REDUCTION, NONE = T.W_SCALE_OUTPUTS.value, T.W_SCALE_REDUCTION.value, T.W_SCALE_NONE.value
ALL_GEMM = T.GPU_GEMM_CONFIGS + T.FMA_GEMM_CONFIGS


def args(x_dtype, w_dtype=None, a_dtype=FP32):
    """Stand-ins for the kernels' tensors: x, the weight, and the adapters (the shrink's A, the GEMM's B)."""
    empty = lambda dtype: torch.empty(0, dtype=dtype)
    return {"x_ptr": empty(x_dtype), "w_ptr": empty(w_dtype or x_dtype), "a_ptr": empty(a_dtype),
            "b_ptr": empty(a_dtype)}


def kept_gemm(target, x_dtype=BF16, w_dtype=None, block_r=16, precision="tf32", adapters=FP32, **flags) -> list[int]:
    kept = T.keep_gemm_configs(ALL_GEMM, args(x_dtype, w_dtype, adapters), target, BLOCK_R=block_r,
                               INPUT_PRECISION=precision, **flags)
    return [ALL_GEMM.index(c) for c in kept]


def kept_shrink(target, x_dtype, a_dtype, block_r) -> list[int]:
    kept = T.keep_shrink_configs(T.GPU_SHRINK_CONFIGS, args(x_dtype, a_dtype=a_dtype), target, BLOCK_R=block_r)
    return [T.GPU_SHRINK_CONFIGS.index(c) for c in kept]


# (arch, GEMM config index, weight dtype, W_SCALE, shared bytes of the build); x bf16, K*r = 16 and 32 alike
GEMM_BUILDS = [
    (90, 0, BF16, NONE, 147_456), (89, 0, BF16, NONE, 98_304), (86, 0, BF16, NONE, 98_304), (80, 0, BF16, NONE, 98_304),
    (90, 1, BF16, NONE, 131_072), (86, 1, BF16, NONE, 98_304), (90, 3, BF16, NONE, 98_304), (86, 3, BF16, NONE, 73_728),
    # fp8 forward: both convert W in registers (sm_90: wgmma's register operand, the operands swapped)
    (90, 0, FP8, OUTPUTS, 81_920), (89, 0, FP8, OUTPUTS, 65_536), (90, 1, FP8, OUTPUTS, 90_112),
    (89, 1, FP8, OUTPUTS, 73_728), (90, 3, FP8, OUTPUTS, 57_344), (89, 3, FP8, OUTPUTS, 49_152),
    (90, 4, FP8, OUTPUTS, 77_824), (89, 4, FP8, OUTPUTS, 61_440),
    # fp8 dX: and the fp32 scales of each W tile
    (90, 0, FP8, REDUCTION, 82_432), (89, 0, FP8, REDUCTION, 66_048), (90, 1, FP8, REDUCTION, 90_880),
    (89, 1, FP8, REDUCTION, 74_496), (90, 3, FP8, REDUCTION, 58_112), (89, 4, FP8, REDUCTION, 62_208),
]
# (arch, shrink config index, adapter dtype, BLOCK_R, shared bytes of the build); x bf16
SHRINK_BUILDS = [
    (90, 1, BF16, 16, 81_920), (89, 1, BF16, 16, 61_440), (90, 1, FP32, 32, 122_880), (89, 1, FP32, 32, 98_304),
    (80, 1, FP32, 32, 98_304), (90, 2, FP32, 16, 34_816), (89, 2, FP32, 16, 24_576), (90, 3, BF16, 32, 61_440),
    (86, 3, BF16, 32, 40_960),
    # 32 rows are too few for wgmma: sm_90 builds mma.sync, with sm_8x's buffers
    (90, 0, FP32, 32, 73_728), (89, 0, FP32, 32, 73_728), (90, 0, BF16, 16, 36_864),
]


@pytest.mark.parametrize("arch,index,w_dtype,w_scale,built", GEMM_BUILDS)
def test_gemm_estimate_equals_the_build(arch, index, w_dtype, w_scale, built):
    for block_r in (16, 32):
        assert T.gemm_smem_bytes(T.GPU_GEMM_CONFIGS[index], arch, block_r, BF16, w_dtype, w_scale) == built


# Registers and spills of real builds (benchmarks/aot_builds.py, Triton 3.9's ptxas): every GEMM build of the
# full grid (sm_80-sm_90, K*r = 16 and 32, bf16 and fp8 weights, bf16 and fp32 adapters, fp8_linear), and
# the fp8 forward and dX at K*r = 64 and 128 (one 3072 x 3072 layer; every FLUX shape builds alike).
MEASURED = json.loads((Path(__file__).parent / "aot_builds" / "gemm_registers.json").read_text())
MEASURED_BUILDS = [dict(zip(MEASURED["columns"], row)) for row in MEASURED["rows"]]


def pruned_for_spilling(build: dict) -> bool:
    config = triton.Config({"BLOCK_M": build["BLOCK_M"], "BLOCK_N": build["BLOCK_N"]}, num_warps=build["num_warps"])
    w_scale = NONE if build["weight_dtype"] == "bfloat16" else REDUCTION if build["kernel"].endswith("_dx") else OUTPUTS
    adapters = build["adapter_dtype"] and getattr(torch, build["adapter_dtype"])
    return T.gemm_spills(config, build["arch"], w_scale, adapters is not None, build["block_r"], adapters)


def test_the_spill_estimate_is_exact_on_the_grid_and_never_keeps_a_spilling_build():
    grid = [b for b in MEASURED_BUILDS if b["block_r"] <= 32]
    wider = [b for b in MEASURED_BUILDS if b["block_r"] > 32]
    assert len(grid) == 380 and len(wider) == 160
    assert [b for b in grid if pruned_for_spilling(b) != (b["spill_bytes"] > 0)] == []
    assert [b for b in wider if b["spill_bytes"] and not pruned_for_spilling(b)] == []
    # beyond the grid the table is conservative: it holds the smallest BLOCK_R that spilled with either
    # adapter dtype (sm_8x's 64x128 fp8 forward at K*r = 64 spills 48 B with fp32 adapters, none with bf16;
    # sm_86's 128x128 dX spills 32 B with bf16 adapters, none with fp32)
    needless = [b for b in wider if not b["spill_bytes"] and pruned_for_spilling(b)]
    assert len(needless) == 4


def test_the_two_4_byte_spills_are_pruned_and_their_siblings_kept():
    spilled = {(b["arch"], b["BLOCK_M"], b["BLOCK_N"], b["num_warps"], b["block_r"], b["adapter_dtype"])
               for b in MEASURED_BUILDS if b["spill_bytes"] and b["kernel"] == "gemm_forward"
               and b["weight_dtype"] == "float8_e4m3fn" and b["block_r"] <= 32}
    assert spilled == {(80, 128, 128, 4, 32, "bfloat16"), (89, 128, 64, 4, 16, "bfloat16")}
    assert kept_gemm(A100, BF16, FP8, block_r=32, adapters=BF16, HAS_LORA=True, W_SCALE=OUTPUTS) == [0, 1, 3, 4]
    assert kept_gemm(RTX4090, BF16, FP8, block_r=16, adapters=BF16, HAS_LORA=True, W_SCALE=OUTPUTS) == [0, 1, 2, 3]


@pytest.mark.parametrize("arch,index,a_dtype,block_r,built", SHRINK_BUILDS)
def test_shrink_estimate_equals_the_build(arch, index, a_dtype, block_r, built):
    assert T.shrink_smem_bytes(T.GPU_SHRINK_CONFIGS[index], arch, block_r, BF16, a_dtype) == built


def test_estimates_by_hand():
    # sm_86 keeps num_stages - 1 = 2 buffers of the 128x64 X tile and the 64x256 W tile (bf16)
    assert T.gemm_smem_bytes(T.GPU_GEMM_CONFIGS[0], 86, 16, BF16, BF16) == 2 * (128 * 64 + 64 * 256) * 2
    # sm_90, fp8 W: 3 buffers of X (wgmma reads it from shared memory), 2 of the fp8 W tile as loaded (it
    # is converted into registers, wgmma's first operand)
    assert T.gemm_smem_bytes(T.GPU_GEMM_CONFIGS[0], 90, 16, BF16, FP8, OUTPUTS) == 3 * 128 * 64 * 2 + 2 * 64 * 256
    # the shrink's fp32 adapters on sm_90: converted into one bf16 tile that wgmma reads from shared memory
    assert T.shrink_smem_bytes(T.GPU_SHRINK_CONFIGS[1], 90, 32, BF16, FP32) == (
        4 * 64 * 128 * 2 + 3 * 128 * 32 * 4 + 128 * 32 * 2)


@pytest.mark.parametrize("card", [RTX3090, RTX4090])
def test_99kb_cards_keep_every_bf16_gemm_tile(card):
    # the sm_90 estimate kept only the two 98,304 B tiles (3 and 4) there; the builds need at most 98,304 B
    for block_r in (16, 32, 128):
        assert kept_gemm(card, block_r=block_r, HAS_LORA=True, W_SCALE=NONE) == [0, 1, 2, 3, 4]
    assert kept_gemm(card, torch.float16) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("card,with_adapters,without", [(RTX4090, [1, 3, 4], [1, 3, 4]),
                                                       (RTX3090, [1, 3, 4], [1, 2, 3, 4]),
                                                       (A100, [1, 2, 3, 4], [1, 2, 3, 4])])
def test_fp8_dx_drops_the_tiles_that_spill_on_mma_sync_cards(card, with_adapters, without):
    # tiles 0 (128x256, 8 warps) and 2 (128x128, 4 warps) spill 64-104 B on sm_89; tile 2 stays at 250-255
    # registers without spilling on sm_80, and on sm_86 without adapters (fp8_linear's dX)
    for adapters in (BF16, FP32):
        assert kept_gemm(card, BF16, FP8, block_r=32, adapters=adapters, HAS_LORA=True, W_SCALE=REDUCTION) == \
            with_adapters
    assert kept_gemm(card, BF16, FP8, block_r=16, HAS_LORA=False, W_SCALE=REDUCTION) == without


@pytest.mark.parametrize("card,block_r,adapters,kept", [
    (A100, 32, BF16, [0, 1, 3, 4]),  # 128x128 with 4 warps: 255 registers and a 4-byte spill
    (A100, 32, FP32, [0, 1, 2, 3, 4]),  # the same tile with fp32 adapters: 255 registers, no spill
    (A100, 16, BF16, [0, 1, 2, 3, 4]),
    (RTX4090, 16, BF16, [0, 1, 2, 3]),  # 128x64: 168 registers and a 4-byte spill
    (RTX4090, 16, FP32, [0, 1, 2, 3, 4]), (RTX4090, 32, BF16, [0, 1, 2, 3, 4]),
    (RTX3090, 64, BF16, [1, 4]),  # wider stacks: the low-rank tiles after the loop spill the large tiles
    (RTX3090, 128, BF16, [0, 1, 2, 3, 4]),  # every tile spills: the autotuner still gets them all
])
def test_fp8_forward_drops_the_builds_that_spill_on_mma_sync_cards(card, block_r, adapters, kept):
    assert kept_gemm(card, BF16, FP8, block_r=block_r, adapters=adapters, HAS_LORA=True, W_SCALE=OUTPUTS) == kept
    assert kept_gemm(card, BF16, FP8, block_r=16, HAS_LORA=False, W_SCALE=OUTPUTS) == [0, 1, 2, 3, 4]  # fp8_linear


@pytest.mark.parametrize("block_r,has_lora,w_scale,kept", [
    (128, True, OUTPUTS, [1, 3, 4]),  # fp8 forward with a wide stack: no 128-accumulator tiles (they spill)
    (64, True, OUTPUTS, [0, 1, 2, 3, 4]),
    (128, True, REDUCTION, [0, 1, 2, 3, 4]),  # dX on sm_90: 250-254 registers, no spill
    (128, False, OUTPUTS, [0, 1, 2, 3, 4]),  # fp8_linear
])
def test_fp8_on_the_h100_keeps_every_tile_that_does_not_spill(block_r, has_lora, w_scale, kept):
    assert kept_gemm(H100, BF16, FP8, block_r=block_r, HAS_LORA=has_lora, W_SCALE=w_scale) == kept


@pytest.mark.parametrize("precision", ["tf32", "ieee"])
def test_fp32_gemm_configs(precision):
    kept = kept_gemm(H100, FP32, precision=precision)
    if precision == "tf32":
        # configs 0-2 need 294,912 / 262,144 B as TF32 builds: the OutOfResources of the issue
        assert kept == [3, 4]
    else:
        # IEEE fp32: only the small FMA tiles (the tensor-core tiles spill)
        assert [ALL_GEMM[i] for i in kept] == T.FMA_GEMM_CONFIGS


def test_shrink_pruning_depends_on_the_card_the_adapter_dtype_and_rank():
    assert kept_shrink(H100, BF16, FP32, 16) == [0, 1, 2, 3]
    assert kept_shrink(H100, BF16, BF16, 128) == [0, 1, 2, 3]
    # fp32 adapters beside bf16 x at K*r = 128: config 1 buffers 64 KB of A per stage (sm_90 build: 294,912 B);
    # config 0 (32 rows: mma.sync, 3 buffers) needs 221,184 B and fits
    assert kept_shrink(H100, BF16, FP32, 128) == [0, 2, 3]
    assert kept_shrink(H100, FP32, FP32, 128) == [2, 3]
    # a 4090 at K*r = 32: config 1's fp32-adapter build needs 98,304 B of its 101,376 (kept; the sm_90
    # estimate, 131,072 B, dropped it)
    assert kept_shrink(RTX4090, BF16, FP32, 32) == [0, 1, 2, 3]
    assert kept_shrink(RTX4090, BF16, FP32, 64) == [2, 3]


def test_a_smaller_device_limit_prunes_more_and_never_returns_nothing():
    assert kept_gemm(T.GpuTarget(90, 100_000)) == [3, 4]  # 98,304 B each
    kept = kept_gemm(T.GpuTarget(90, 1_000))
    assert len(kept) == 1 and T.gemm_smem_bytes(ALL_GEMM[kept[0]], 90, 16, BF16, BF16) == 98_304  # its build fails


def test_an_unknown_card_gets_the_larger_estimates_and_drops_every_tile_that_spills_somewhere():
    for config in T.GPU_GEMM_CONFIGS:
        for w_dtype, w_scale in ((BF16, NONE), (FP8, OUTPUTS), (FP8, REDUCTION)):
            known = max(T.gemm_smem_bytes(config, arch, 32, BF16, w_dtype, w_scale) for arch in CARDS)
            assert T.gemm_smem_bytes(config, None, 32, BF16, w_dtype, w_scale) >= known
            for has_lora, block_r, adapters in itertools.product((True, False), (16, 32, 64, 128), (BF16, FP32)):
                spills = any(T.gemm_spills(config, arch, w_scale, has_lora, block_r, adapters) for arch in CARDS)
                assert T.gemm_spills(config, None, w_scale, has_lora, block_r, adapters) >= spills
                assert T.gemm_spills(config, 120, w_scale, has_lora, block_r, adapters) >= spills  # sm_120
                assert T.gemm_spills(config, 89, w_scale, has_lora, block_r, None) >= T.gemm_spills(
                    config, 89, w_scale, has_lora, block_r, adapters)  # adapter dtype not known
    for config in T.GPU_SHRINK_CONFIGS:
        known = max(T.shrink_smem_bytes(config, arch, 32, BF16, FP32) for arch in CARDS)
        assert T.shrink_smem_bytes(config, None, 32, BF16, FP32) >= known


@pytest.fixture()
def cuda_cards(monkeypatch):
    """Fakes torch.cuda's cards: cuda_cards({index: (major, minor, opt-in limit or None)}, hip=None)."""
    def install(cards, hip=None):
        def properties(index):
            major, minor, optin = cards[index]
            optional = {} if optin is None else {"shared_memory_per_block_optin": optin}
            return SimpleNamespace(major=major, minor=minor, **optional)

        monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.version, "hip", hip)
        T._cuda_target.cache_clear()

    yield install
    T._cuda_target.cache_clear()  # no fake card outlives the test


def test_device_target_reads_each_cards_own_limit(cuda_cards):
    cuda_cards({0: (9, 0, 232_448), 1: (8, 6, 101_376)})
    assert T.device_target(torch.device("cuda")) == T.GpuTarget(90, 232_448)
    assert T.device_target(torch.device("cuda", 1)) == T.GpuTarget(86, 101_376)


def test_device_target_without_the_property_is_never_the_h100_figure(cuda_cards):
    cuda_cards({0: (8, 9, None), 1: (12, 0, None)})
    assert T.device_target(torch.device("cuda", 0)) == T.GpuTarget(89, 101_376)  # a card of the table
    assert T.device_target(torch.device("cuda", 1)) == T.GpuTarget(120, 65_536)  # unknown: 64 KB


def test_device_target_on_rocm_has_no_sm_arch(cuda_cards):
    cuda_cards({0: (9, 4, None)}, hip="6.2")  # an MI300: "9.4" is gfx942, not sm_94
    assert T.device_target(torch.device("cuda", 0)) == T.GpuTarget(None, 65_536)


def test_device_target_off_cuda_is_unknown_and_small():
    assert T.device_target(torch.device("cpu")) == T.GpuTarget(None, 65_536)


def test_prune_hooks_prune_for_the_card_x_lives_on(monkeypatch):
    seen = []
    monkeypatch.setattr(T, "device_target", lambda device: seen.append(device) or RTX4090)
    named = args(BF16, FP8, a_dtype=FP32)
    gemm = T.prune_gemm_configs(ALL_GEMM, named, BLOCK_R=32, INPUT_PRECISION="ieee", HAS_LORA=True, W_SCALE=REDUCTION)
    assert gemm == T.keep_gemm_configs(ALL_GEMM, named, RTX4090, BLOCK_R=32, INPUT_PRECISION="ieee", HAS_LORA=True,
                                       W_SCALE=REDUCTION)
    assert [ALL_GEMM.index(c) for c in gemm] == [1, 3, 4]
    shrink = T.prune_shrink_configs(T.GPU_SHRINK_CONFIGS, named, BLOCK_R=64)
    assert shrink == T.keep_shrink_configs(T.GPU_SHRINK_CONFIGS, named, RTX4090, BLOCK_R=64)
    assert seen == [named["x_ptr"].device] * 2


@pytest.mark.parametrize("kernel", [T._scaled_shrink_kernel, T._fused_linear_kernel])
def test_autotune_key_holds_every_build_flag_and_buckets_m(kernel):
    """Every constexpr that is not a tuned block size (or derived from the key by a heuristic) changes
    the build, so it must be in the key; M only as its power-of-two bucket."""
    tuner = kernel
    tuned = set(T.GPU_GEMM_CONFIGS[0].kwargs) | set(T.GPU_SHRINK_CONFIGS[0].kwargs)
    params = inspect.signature(tuner.base_fn).parameters.values()
    constexprs = {p.name for p in params if p.annotation in (triton.language.constexpr, "tl.constexpr")}
    assert {"BLOCK_R", "UPCAST", "INPUT_PRECISION"} <= constexprs
    derived = {"EVEN_D"}  # D % BLOCK_D, with D in the key
    assert constexprs - tuned - derived <= set(tuner.keys)
    assert "INPUT_PRECISION" in tuner.keys and "M_BUCKET" in tuner.keys and "M" not in tuner.keys
    assert {"stride_xd"} <= set(tuner.keys)  # the layout (Triton specialises on unit strides)
    assert tuner.early_config_prune is not None


def test_disk_cache_requested_where_triton_has_it():
    has = "cache_results" in inspect.signature(triton.autotune).parameters
    assert T._DISK_CACHE == ({"cache_results": True} if has else {})


def test_kernels_receive_the_m_bucket(monkeypatch):
    seen = []
    real = T._fused_linear_kernel.run

    def spy(*a, **kw):
        seen.append(dict(zip(T._fused_linear_kernel.arg_names, a)))
        return real(*a, **kw)

    monkeypatch.setattr(T._fused_linear_kernel, "run", spy)
    x, w = torch.randn(37, 32), torch.randn(32, 32)
    h, b, s = torch.zeros(37, 16), torch.zeros(32, 16), torch.zeros(37, 1)
    T.fused_linear(x, w, None, h, b, s, 16)
    assert seen[0]["M"] == 37 and seen[0]["M_BUCKET"] == 64


def integer_gemm_inputs(dtype, M, N, D, KR, seed):
    """Small integers everywhere (fp8 weights, power-of-two scales): every product and sum is exact in
    fp32 and in the outputs' dtype, whatever the summation order, so results can be compared exactly."""
    g = torch.Generator().manual_seed(seed)
    ints = lambda low, high, *shape: torch.randint(low, high + 1, shape, generator=g).float()
    big = 3 if dtype == torch.float32 else 1  # bf16 outputs stay below 256, where bf16 holds every integer
    x, w = ints(-big, big, M, D).to(dtype), ints(-2, 2, N, D).to(FP8)
    w_scale = 2.0 ** ints(-1, 1, N)
    s = ints(0, 1, M, 2)  # per-token scales of two adapters: on or off
    h = ints(-2, 2, M, KR) * s.repeat_interleave(KR // 2, dim=1)  # H~ = S (x) (X A^T): 0 where S is
    lora_a, lora_b = ints(-1, 1, KR, D).to(dtype), ints(-1, 1, N, KR).to(dtype)
    return x, w, w_scale, ints(-3, 3, N).to(dtype), h, lora_a, lora_b, s


def launch_flags(monkeypatch) -> list[tuple[bool, bool]]:
    """Records each GEMM launch's (SWAP_AB, LOOP_RUNS) flags."""
    seen, real = [], T._fused_linear_kernel.run
    monkeypatch.setattr(T._fused_linear_kernel, "run",
                        lambda *a, **kw: seen.append((kw["SWAP_AB"], kw["LOOP_RUNS"])) or real(*a, **kw))
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [96, 80])  # whole D tiles (no masks in the loop), and a masked last tile
def test_the_h100_fp8_gemm_swaps_its_operands_with_the_same_results(dtype, D, monkeypatch):
    """On sm_90 the fp8 GEMM computes acc^T = W X^T (so the converted W is wgmma's register operand): the
    forward, the dX (W^T with the scales along the reduction) and fp8_linear equal the unswapped kernel's
    and the exact integer result."""
    M, N, KR = 37, 48, 16
    x, w, w_scale, bias, h, lora_a, lora_b, s = integer_gemm_inputs(dtype, M, N, D, KR, seed=D)
    dy = x[:, :N].contiguous()  # dX = dY W + G~ A, as the backward calls it: W^T and A^T as views
    w64 = w.double() * w_scale.double()[:, None]
    h64 = h.double()  # H~ (G~ in the dX): the kernel adds H~ B^T as it is, unscaled
    calls = {  # name: (the call, its exact value)
        "forward": (lambda: T.fused_linear(x, w, bias, h, lora_b, s, KR // 2, w_scale, 0),
                    x.double() @ w64.t() + bias.double() + h64 @ lora_b.double().t()),
        "dX": (lambda: T.fused_linear(dy, w.t(), None, h, lora_a.t(), s, KR // 2, w_scale, 1),
               dy.double() @ w64 + h64 @ lora_a.double()),
        "fp8_linear": (lambda: T.fused_linear(x, w, None, None, None, None, 0, w_scale, 0), x.double() @ w64.t()),
    }
    flags = launch_flags(monkeypatch)
    plain = {name: call() for name, (call, _) in calls.items()}
    monkeypatch.setattr(T, "device_target", lambda device: H100)
    on_h100 = {name: call() for name, (call, _) in calls.items()}
    assert flags == [(False, False)] * 3 + [(True, True)] * 3
    for name, (_, exact) in calls.items():
        assert torch.equal(on_h100[name], plain[name]), name
        assert torch.equal(on_h100[name].double(), exact), name


def test_only_fp8_gemms_on_sm90_swap_and_only_sm90_is_promised_a_loop():
    for arch in (80, 86, 89, None, 120):
        assert not any(T.swaps_ab(arch, w_scale) for w_scale in (NONE, OUTPUTS, REDUCTION))
        assert not T.loop_runs(arch, 3072)
    assert [T.swaps_ab(90, w_scale) for w_scale in (NONE, OUTPUTS, REDUCTION)] == [False, True, True]
    assert T.loop_runs(90, 1) and not T.loop_runs(90, 0)


def test_a_gemm_without_a_reduction_on_the_h100_is_not_promised_a_loop(monkeypatch):
    """D = 0 (the dX of a layer with no outputs): Y is the bias and the low-rank term; the kernel must not
    assume a loop that never runs."""
    flags = launch_flags(monkeypatch)
    monkeypatch.setattr(T, "device_target", lambda device: H100)
    x, w, w_scale = torch.zeros(5, 0), torch.zeros(16, 0).to(FP8), torch.ones(16)
    h, lora_b, s = torch.ones(5, 16), torch.ones(16, 16), torch.ones(5, 2)
    y = T.fused_linear(x, w, torch.full((16,), 2.0), h, lora_b, s, 8, w_scale, 0)
    assert flags == [(True, False)] and torch.equal(y, torch.full((5, 16), 18.0))
