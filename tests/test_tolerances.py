"""tests/tolerances.py: the scale-relative ULP comparison every test uses across BLAS routes."""
import pytest
import torch
import torch.nn.functional as F

from tolerances import assert_close_ulps, ulps_apart


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 2.0 ** -20, 2.0 ** 30])
def test_counts_ulps_of_the_largest_expected_value(dtype, scale):
    eps = torch.finfo(dtype).eps
    expected = torch.tensor([1.0, 0.5, -0.25], dtype=dtype) * scale
    actual = expected.clone()
    actual[1] += 3 * eps * scale  # 0.5 + 3 eps is exact: 0.5's own spacing is eps / 2
    assert ulps_apart(actual, expected) == 3
    assert_close_ulps(actual, expected, ulps=3)
    with pytest.raises(AssertionError, match="3.0 ULPs"):
        assert_close_ulps(actual, expected, ulps=2)
    assert_close_ulps(expected.clone(), expected, ulps=0)


def test_rejects_shape_dtype_and_non_finite_mismatches():
    x = torch.ones(2, 3)
    with pytest.raises(AssertionError, match="shape"):
        assert_close_ulps(x, torch.ones(3, 2))
    with pytest.raises(AssertionError, match="dtype"):
        assert_close_ulps(x.double(), x)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close_ulps(torch.full((2, 3), float("nan")), x)
    with pytest.raises(AssertionError, match="ULPs"):
        assert_close_ulps(torch.full((2, 3), 1e-30), torch.zeros(2, 3))  # an all-zero expectation is exact
    assert_close_ulps(torch.zeros(2, 3), torch.zeros(2, 3), ulps=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_strided_3d_linear_and_its_2d_copy_agree_to_a_few_ulps(dtype):
    """The case that made torch.equal fail on AMD EPYC: nn.Linear on a 3-D slice of a longer sequence
    (it cannot be viewed as 2-D) against the same linear on the flattened contiguous copy. Bit-equal on
    some CPUs, some ULPs apart on others (measured on AMD EPYC, MKL 2024.2: float64 3.3 ULPs at width
    96, 8.4 at 384, 26 at 3072; float32 0, 0.7, 1.4): the spread grows with the reduction length."""
    g = torch.Generator().manual_seed(0)
    joint = torch.randn(2, 42, 384, generator=g, dtype=dtype)
    x = joint[:, :12]  # the text tokens of a joint attention output: strides (42*384, 384, 1)
    w, b = torch.randn(384, 384, generator=g, dtype=dtype) / 20, torch.randn(384, generator=g, dtype=dtype)
    strided = F.linear(x, w, b)
    flat = F.linear(x.reshape(-1, 384), w, b).reshape(2, 12, 384)
    assert_close_ulps(strided, flat, ulps=32)
