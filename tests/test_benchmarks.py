"""Helpers the benchmark scripts share: the ratio spread of interleaved repetitions, the op counter; the toy
copy-spread benchmark's statistics."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_lora import ratio_spread  # noqa: E402
from op_counts import count_ops  # noqa: E402
from toy_copy_spread import copy_stats, core_colors, measure  # noqa: E402

from slideredit.toy.shapes import make_example, render  # noqa: E402

TOY = Path(__file__).resolve().parents[1] / "assets" / "toy-kontext"


def test_ratio_spread_pairs_repetitions():
    # repetition i of the variant against repetition i of the base, not medians against medians
    assert ratio_spread([2.0, 3.0, 4.0, 9.0], [1.0, 1.0, 2.0, 3.0]) == (2.0, 2.5, 3.0)


def test_count_ops_counts_aten_calls_and_views():
    x = torch.randn(4, 3)
    assert count_ops(lambda: x + 1) == (1, 1)
    assert count_ops(lambda: (x.t() @ x).view(-1)) == (3, 1)  # t and view alias x; mm runs


def test_copy_stats_split_the_error_into_a_shared_bias_and_a_noise_spread():
    source = np.array([100.0, 100.0, 100.0])
    colors = np.array([[103.0, 104.0, 100.0], [97.0, 96.0, 100.0]])  # 5 off each way, around the source
    assert copy_stats(colors, source) == pytest.approx({"error": 5.0, "bias": 0.0, "spread": 5.0})
    shifted = colors + [0.0, 0.0, 12.0]  # the same two seeds, both 12 bluer
    assert copy_stats(shifted, source) == pytest.approx({"error": 13.0, "bias": 12.0, "spread": 5.0})


def test_core_colors_of_an_exact_render_are_the_scenes_colours():
    scene = make_example(30_000, 0, num_edits=0).source
    for kind, color in core_colors(render(scene), scene).items():
        assert np.abs(color - scene.shape(kind).color).max() < 0.5, kind


def test_copy_spread_measures_each_untouched_shape_of_each_prompt():
    scene = make_example(30_000, 0, num_edits=0).source
    result = measure(TOY, [scene])
    assert result["autoencoder"][0] < 25  # measured 10-20 RGB on held-out scenes
    assert set(result["keep the image the same"][0]) == {"square", "circle"}
    assert set(result["make the square darker"][0]) == {"circle"}
    assert set(result["make the circle larger"][0]) == {"square"}
    for stats in result["make the circle larger"][0].values():
        # the noise moves the colour; the mean distance is at least the distance of the mean
        assert stats["spread"] > 0 and stats["error"] >= stats["bias"] - 1e-9
