"""Helpers the benchmark scripts share: the ratio spread of interleaved repetitions, the op counter."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_lora import ratio_spread  # noqa: E402
from op_counts import count_ops  # noqa: E402


def test_ratio_spread_pairs_repetitions():
    # repetition i of the variant against repetition i of the base, not medians against medians
    assert ratio_spread([2.0, 3.0, 4.0, 9.0], [1.0, 1.0, 2.0, 3.0]) == (2.0, 2.5, 3.0)


def test_count_ops_counts_aten_calls_and_views():
    x = torch.randn(4, 3)
    assert count_ops(lambda: x + 1) == (1, 1)
    assert count_ops(lambda: (x.t() @ x).view(-1)) == (3, 1)  # t and view alias x; mm runs
