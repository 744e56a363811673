"""Comparing float results that may come from different BLAS routes (the rule is in tests/README.md).

Exact equality (`torch.equal`) is right only where both sides run the same kernels on the same shapes
and strides. Elsewhere the BLAS library may block a GEMM differently: MKL picks its routine by CPU
(Intel vs AMD EPYC) and by operand layout (a strided 3-D slice vs its contiguous 2-D copy), so the two
sides agree only to a few units in the last place. `assert_close_ulps` allows exactly that, measured
against the output's scale: max |actual - expected| <= ulps * eps(dtype) * max |expected|.
"""
import torch


def ulps_apart(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| in units of eps(expected.dtype) * max |expected| (computed in float64)."""
    err = (actual.double() - expected.double()).abs().max().item()
    scale = torch.finfo(expected.dtype).eps * expected.double().abs().max().item()
    return err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))


def assert_close_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: float = 8) -> None:
    """Same shape and dtype, all finite, and within `ulps` ULPs of max |expected| everywhere."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != expected {expected.dtype}"
    if expected.numel() == 0:
        return
    assert actual.isfinite().all() and expected.isfinite().all(), "non-finite values"
    apart = ulps_apart(actual, expected)
    assert apart <= ulps, (f"{apart:.1f} ULPs of max|expected| = {expected.abs().max().item():.3g} apart "
                           f"(max abs diff {(actual.double() - expected.double()).abs().max().item():.3g}); "
                           f"allowed {ulps}")
