"""Slider scales per step and per image, without a model: windows, per-image lists, callables, updates."""
import warnings

import numpy as np
import pytest
import torch

from slideredit.slider_schedule import SliderSchedule, acts, alpha_batch, check_windows, normalise_alpha
from slideredit.sliders import GSTLORA, STLORA


def test_window_rule_start_inclusive_end_exclusive():
    assert [acts((0.2, 1.0), i, 10) for i in range(10)] == [False] * 2 + [True] * 8
    assert [acts((1 / 3, 1.0), i, 3) for i in range(3)] == [False, True, True]  # a start on a step acts there
    assert [acts((0.0, 2 / 3), i, 3) for i in range(3)] == [True, True, False]  # an end on a step does not
    assert [acts((0.0, 1.0), i, 7) for i in range(7)] == [True] * 7


def test_windows_are_checked():
    assert check_windows(None, 2, False) == [(0.0, 1.0)]
    assert check_windows((0.25, 1), 2, True) == [(0.25, 1.0)]
    assert check_windows([(0, 1), (0.5, 1)], 2, False) == [(0.0, 1.0), (0.5, 1.0)]
    for bad in [(0.5, 0.5), (-0.1, 1), (0, 1.5), (0, float("nan")), (0.5,), "0,1"]:
        with pytest.raises(ValueError, match="slider_steps"):
            check_windows(bad, None, True)
    with pytest.raises(ValueError, match="one window per STLoRA sub-prompt"):
        check_windows([(0, 1), (0.5, 1)], 2, True)


def test_alphas_lists_and_batch():
    assert normalise_alpha(np.float32(0.5), "a") == 0.5
    assert normalise_alpha((1, -1.0), "a") == [1.0, -1.0]
    assert normalise_alpha(np.array([0.0, 1.0]), "a") == [0.0, 1.0]
    assert alpha_batch([None, 0.5, [1, 2, 3], (0, 1, 2), lambda i, s: 0.0]) == 3
    assert alpha_batch([0.5, None]) is None
    with pytest.raises(ValueError, match="different lengths"):
        alpha_batch([[1, 2], [1, 2, 3]])
    with pytest.raises(ValueError, match=r"a\[1\] must be a finite number"):
        normalise_alpha([0.0, float("inf")], "a")
    with pytest.warns(UserWarning, match="far outside"):
        normalise_alpha(10.5, "a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normalise_alpha(-10.0, "a")


def test_scales_per_step_and_image():
    spans = [[(0, 2), (3, 5)]] * 2  # two images, the same two sub-prompt spans
    schedule = SliderSchedule(2, 4, 6, [(0, 1), (0.5, 1)], slider_alpha=None, subprompts=["a", "b"], spans=spans,
                              slider_alpha_list=[[1.0, -1.0], lambda i, sigma: sigma])
    gst, st = schedule.scales(0, 0.9)
    assert gst is None
    assert torch.equal(st, torch.tensor([[1.0, 1, 0, 0, 0, 0], [-1, -1, 0, 0, 0, 0]]))  # "b" not acting yet
    _, later = schedule.scales(2, 0.25)
    assert torch.equal(later, torch.tensor([[1.0, 1, 0, 0.25, 0.25, 0], [-1, -1, 0, 0.25, 0.25, 0]]))
    assert schedule.scales(3, 0.25)[1] is later  # unchanged alphas: the same tensor, nothing to set again
    schedule.update(slider_alpha_list=[0.0, 2.0])
    assert torch.equal(schedule.scales(3, 0.25)[1], torch.tensor([[0.0, 0, 0, 2, 2, 0]] * 2))
    with pytest.raises(ValueError, match="only when the call gave slider_alpha"):
        schedule.update(slider_alpha=1.0)
    with pytest.raises(ValueError, match="do not match the batch of 2"):
        schedule.update(slider_alpha_list=[[1.0, 2.0, 3.0], 0.0])


def test_each_image_scales_the_spans_of_its_own_prompt():
    """A batch of two prompts: the sub-prompts sit at other tokens in each, and each row follows its own
    image's spans (and its own per-image alpha)."""
    spans = [[(0, 2), (3, 4)], [(2, 4), (0, 1)]]  # image 0 then image 1, sub-prompt "a" then "b"
    schedule = SliderSchedule(2, 1, 5, [(0, 1)], subprompts=["a", "b"], spans=spans,
                              slider_alpha_list=[[2.0, -1.0], 0.5])
    assert torch.equal(schedule.scales(0, 1.0)[1], torch.tensor([[2.0, 2, 0, 0.5, 0], [0.5, 0, -1, -1, 0]]))


def test_gstlora_scale_forms():
    assert SliderSchedule(1, 2, 4, [(0, 1)], slider_alpha=0.5).scales(0, 1.0) == (0.5, None)
    batched = SliderSchedule(3, 2, 4, [(0.5, 1)], slider_alpha=[0.0, 0.5, 1.0])
    assert batched.scales(0, 1.0) == (None, None)  # before its window: off
    assert torch.equal(batched.scales(1, 0.5)[0], torch.tensor([[0.0], [0.5], [1.0]]))
    with pytest.raises(ValueError, match=r"slider_alpha\(0, 1.0000\) must be a finite number"):
        SliderSchedule(1, 2, 4, [(0, 1)], slider_alpha=lambda i, sigma: float("nan")).scales(0, 1.0)


def test_scales_to_set_hands_out_changes_only_and_no_stlora_on_the_negative_pass():
    """A model call needs only the scales that changed since the one before; true CFG's negative pass
    switches the STLoRA off and keeps the GSTLoRA."""
    schedule = SliderSchedule(1, 4, 3, [(0, 1)], slider_alpha=0.5, subprompts=["a"], spans=[[(0, 2)]],
                              slider_alpha_list=[lambda i, sigma: 1.0 if i < 2 else 2.0])
    first = schedule.scales_to_set(0, 1.0)
    assert sorted(first) == [GSTLORA, STLORA] and first[GSTLORA] == 0.5
    assert torch.equal(first[STLORA], torch.tensor([[1.0, 1, 0]]))
    assert schedule.scales_to_set(0, 1.0) == {}  # the same step again: nothing to set
    assert schedule.scales_to_set(0, 1.0, negative_pass=True) == {STLORA: None}
    again = schedule.scales_to_set(1, 0.5)  # the positive pass of the next step: the STLoRA back, same alpha
    assert list(again) == [STLORA] and again[STLORA] is first[STLORA]
    later = schedule.scales_to_set(2, 0.25)  # a new alpha
    assert list(later) == [STLORA] and torch.equal(later[STLORA], torch.tensor([[2.0, 2, 0]]))
    unused = SliderSchedule(1, 4, 3, [(0, 1)])  # loaded adapters the call does not use are switched off once
    assert unused.scales_to_set(0, 1.0) == {GSTLORA: None, STLORA: None}
    assert unused.scales_to_set(1, 0.5) == {}
