"""kernels.masked_lora_triton's build decisions, as pure functions: config pruning and autotune keys.

The GPU config lists are pruned here with CPU stand-ins for the kernel arguments (the hook reads only
dtypes and the device). The byte counts quoted are from sm_90 builds of these kernels (Triton 3.9 on a
CPU machine, launch-like specialisation); the H100 / H200 limit is 232,448 B.
"""
import inspect

import pytest
import torch
import triton

from slideredit.kernels import masked_lora_triton as T

H100 = T.DEFAULT_SMEM_LIMIT


def args(x_dtype, w_dtype=None, a_dtype=torch.float32):
    empty = lambda dtype: torch.empty(0, dtype=dtype)
    return {"x_ptr": empty(x_dtype), "w_ptr": empty(w_dtype or x_dtype), "a_ptr": empty(a_dtype)}


def test_gemm_estimate_matches_the_sm90_build():
    # 128 x 256 x 64, 3 stages, bf16: three stages of a 128x64 X tile and a 64x256 W tile
    assert T.gemm_smem_bytes(T.GPU_GEMM_CONFIGS[0], 16, 2, 2) == 3 * (128 * 64 + 64 * 256) * 2 == 147_456


def test_fp8_gemm_estimate_covers_the_sm90_builds():
    # sm_90 builds of the fp8-weight GEMM (bf16 x), forward and dX: 114,688 and 115,200 B for config 0,
    # 106,496 and 107,264 B for config 1 (the converted W tile is staged once more)
    assert T.gemm_smem_bytes(T.GPU_GEMM_CONFIGS[0], 32, 2, 1) >= 115_200
    assert T.gemm_smem_bytes(T.GPU_GEMM_CONFIGS[1], 32, 2, 1) >= 107_264
    kept = T.prune_gemm_configs(T.GPU_GEMM_CONFIGS + T.FMA_GEMM_CONFIGS,
                                args(torch.bfloat16, torch.float8_e4m3fn), BLOCK_R=32, INPUT_PRECISION="tf32")
    assert kept == T.GPU_GEMM_CONFIGS


@pytest.mark.parametrize("block_r,has_lora,w_scale,kept", [
    (128, True, T.W_SCALE_OUTPUTS, [1, 3, 4]),  # fp8 forward with a wide stack: no 128-accumulator tiles (they spill)
    (64, True, T.W_SCALE_OUTPUTS, [0, 1, 2, 3, 4]),
    (128, True, T.W_SCALE_REDUCTION, [0, 1, 2, 3, 4]),  # dX: the low-rank tiles come before the loop
    (128, False, T.W_SCALE_OUTPUTS, [0, 1, 2, 3, 4]),  # fp8_linear
])
def test_fp8_forward_with_wide_stacks_drops_tiles_that_spill(block_r, has_lora, w_scale, kept):
    got = T.prune_gemm_configs(T.GPU_GEMM_CONFIGS + T.FMA_GEMM_CONFIGS, args(torch.bfloat16, torch.float8_e4m3fn),
                               BLOCK_R=block_r, INPUT_PRECISION="tf32", HAS_LORA=has_lora, W_SCALE=w_scale.value)
    assert [T.GPU_GEMM_CONFIGS.index(c) for c in got] == kept


@pytest.mark.parametrize("precision", ["tf32", "ieee"])
def test_fp32_gemm_configs(precision):
    kept = T.prune_gemm_configs(T.GPU_GEMM_CONFIGS + T.FMA_GEMM_CONFIGS, args(torch.float32), BLOCK_R=16,
                                INPUT_PRECISION=precision)
    if precision == "tf32":
        # configs 0-2 need 294,912 / 262,144 B as TF32 builds: the OutOfResources of the issue
        assert [T.GPU_GEMM_CONFIGS.index(c) for c in kept] == [3, 4]
    else:
        # IEEE fp32: only the small FMA tiles (the tensor-core tiles spill)
        assert kept == T.FMA_GEMM_CONFIGS


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_gemm_keeps_every_tensor_core_config(dtype):
    for block_r in (16, 128):
        kept = T.prune_gemm_configs(T.GPU_GEMM_CONFIGS + T.FMA_GEMM_CONFIGS, args(dtype), BLOCK_R=block_r,
                                    INPUT_PRECISION="tf32")
        assert kept == T.GPU_GEMM_CONFIGS


def test_shrink_pruning_depends_on_the_adapter_dtype_and_rank():
    prune = lambda x, a, r: [T.GPU_SHRINK_CONFIGS.index(c)
                             for c in T.prune_shrink_configs(T.GPU_SHRINK_CONFIGS, args(x, a_dtype=a), BLOCK_R=r)]
    assert prune(torch.bfloat16, torch.float32, 16) == [0, 1, 2, 3]
    assert prune(torch.bfloat16, torch.bfloat16, 128) == [0, 1, 2, 3]
    # fp32 adapters beside bf16 x at K*r = 128: the 4-stage, 128-deep configs buffer 64 KB of A per stage
    # (config 1's sm_90 build needs 294,912 B; config 0's 221,184 B would fit: the estimate is an upper bound)
    assert prune(torch.bfloat16, torch.float32, 128) == [2, 3]
    assert prune(torch.float32, torch.float32, 128) == [2, 3]


def test_a_smaller_device_limit_prunes_more_and_never_returns_nothing(monkeypatch):
    monkeypatch.setattr(T, "smem_limit", lambda device: 100_000)
    kept = T.prune_gemm_configs(T.GPU_GEMM_CONFIGS, args(torch.bfloat16), BLOCK_R=16, INPUT_PRECISION="tf32")
    assert kept == [T.GPU_GEMM_CONFIGS[3], T.GPU_GEMM_CONFIGS[4]]  # 98,304 B each
    monkeypatch.setattr(T, "smem_limit", lambda device: 1_000)
    kept = T.prune_gemm_configs(T.GPU_GEMM_CONFIGS, args(torch.bfloat16), BLOCK_R=16, INPUT_PRECISION="tf32")
    assert len(kept) == 1 and T.gemm_smem_bytes(kept[0], 16, 2, 2) == 98_304  # the smallest: its build fails


def test_smem_limit_off_cuda_is_the_h100_figure():
    assert T.smem_limit(torch.device("cpu")) == 232_448


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
