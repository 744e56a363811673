"""STLoRA token selection at the unit level: the FIRST exact match of a sub-prompt, and spans that
overlap or nest multiply their alphas. A word-level stand-in tokenizer makes every span hand-checkable."""
import numpy as np
import pytest
import torch

from slideredit.token_selection import (batch_span_scales, find_span, is_number, span_scales, subprompt_spans,
                                        subprompt_token_scales)

EOS = 1
VOCAB: dict[str, int] = {}


def tokenize(text: str) -> list[int]:
    """One id per word, EOS last (as the T5 tokenizer without padding)."""
    return [VOCAB.setdefault(word, len(VOCAB) + 2) for word in text.split()] + [EOS]


def expected(length: int, values: dict[int, float]) -> torch.Tensor:
    out = torch.zeros(length)
    for index, value in values.items():
        out[index] = value
    return out


def test_find_span_takes_the_first_match():
    assert find_span([5, 6, 5, 6, 7], [5, 6]) == 0
    assert find_span([9, 5, 6, 5, 6], [5, 6]) == 1
    assert find_span([5, 6, 7], [6, 7, 8]) is None
    assert find_span([5, 6], [5, 6]) == 0


def test_repeated_subprompt_selects_only_its_first_occurrence():
    prompt = "make it red and make it red"  # words 0..2, "and" 3, words 4..6, EOS 7
    scales = subprompt_token_scales(prompt, ["make it red"], [0.5], tokenize, max_length=10)
    assert torch.equal(scales, expected(10, {0: 0.5, 1: 0.5, 2: 0.5}))
    assert subprompt_spans(prompt, ["it red", "make it red"], tokenize, 10) == [(1, 3), (0, 3)]


def test_nested_spans_multiply():
    prompt = "make the hair red and add a hat"
    scales = subprompt_token_scales(prompt, ["make the hair red", "hair red"], [2.0, 3.0], tokenize, max_length=12)
    # "make the" only in the outer span (2); "hair red" in both (2 * 3); "and ..." and EOS in none (0)
    assert torch.equal(scales, expected(12, {0: 2.0, 1: 2.0, 2: 6.0, 3: 6.0}))


def test_overlapping_spans_multiply_and_order_does_not_matter():
    prompt = "alpha beta gamma delta"
    first = subprompt_token_scales(prompt, ["alpha beta", "beta gamma"], [2.0, -0.5], tokenize, max_length=6)
    assert torch.equal(first, expected(6, {0: 2.0, 1: -1.0, 2: -0.5}))
    swapped = subprompt_token_scales(prompt, ["beta gamma", "alpha beta"], [-0.5, 2.0], tokenize, max_length=6)
    assert torch.equal(swapped, first)


def test_zero_alpha_selects_with_scale_zero_and_none_leaves_unselected():
    spans = [(0, 2), (1, 3)]
    assert torch.equal(span_scales(spans, [0.0, 3.0], 4), expected(4, {2: 3.0}))  # 0 * 3 on the overlap
    assert torch.equal(span_scales(spans, [None, 3.0], 4), expected(4, {1: 3.0, 2: 3.0}))  # only the second acts
    with pytest.raises(ValueError):
        span_scales(spans, [1.0], 4)  # one alpha per span


def test_a_batch_gives_each_prompt_its_own_spans_and_alphas():
    """Row b is built from prompt b's spans and alphas only: two prompts whose spans sit apart, overlap
    in one of them, and a None (that slider not acting) in the second."""
    scales = batch_span_scales([[(0, 2), (1, 3)], [(3, 5), (4, 6)]], [[2.0, -0.5], [None, 3.0]], 6)
    assert torch.equal(scales, torch.stack([expected(6, {0: 2.0, 1: -1.0, 2: -0.5}), expected(6, {4: 3.0, 5: 3.0})]))
    with pytest.raises(ValueError):
        batch_span_scales([[(0, 2)], [(1, 3)]], [[1.0]], 4)  # one list of alphas per prompt


def test_errors_name_the_subprompt():
    with pytest.raises(ValueError, match="sub-prompt 'add a scarf' is not in the prompt"):
        subprompt_spans("add a hat", ["add a scarf"], tokenize)
    with pytest.raises(ValueError, match="past the 4-token truncation"):
        subprompt_spans("one two three four five", ["four five"], tokenize, max_length=4)
    with pytest.raises(ValueError, match="finite"):
        subprompt_token_scales("add a hat", ["add a hat"], [float("nan")], tokenize)


def test_alphas_may_be_numpy_scalars_but_not_bools():
    assert is_number(np.float32(0.5)) and is_number(np.float64(1)) and is_number(2)
    assert not is_number(True) and not is_number("1") and not is_number(None)
    scales = subprompt_token_scales("add a hat", ["add a hat"], (np.float32(0.5),), tokenize, max_length=4)
    assert torch.equal(scales, expected(4, {0: 0.5, 1: 0.5, 2: 0.5}))
