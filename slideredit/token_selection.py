"""STLoRA token selection: which T5 tokens of the prompt each sub-prompt's slider scales.

As the SliderEdit release does it: tokenize the full prompt and each sub-prompt with the T5 tokenizer
(no padding), drop the sub-prompt's trailing EOS, and take the FIRST exact contiguous match of its ids
in the prompt's ids. A token's scale is the product of the alphas of the spans holding it; tokens in
no span (joiners such as " and ", EOS, padding) get 0: the adapter does not touch them at all.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch

Span = tuple[int, int]  # [start, end) in the prompt's T5 tokens


def find_span(prompt_ids: Sequence[int], sub_ids: Sequence[int]) -> int | None:
    """Start of the first exact occurrence of sub_ids in prompt_ids, or None."""
    n = len(sub_ids)
    for start in range(len(prompt_ids) - n + 1):
        if list(prompt_ids[start:start + n]) == list(sub_ids):
            return start
    return None


def subprompt_spans(prompt: str, subprompts: Sequence[str], tokenize: Callable[[str], list[int]],
                    max_length: int = 512, show_tokens: Callable[[list[int]], list[str]] | None = None) -> list[Span]:
    """-> one [start, end) T5 token span per sub-prompt, in order.

    tokenize(text) gives T5 ids with the trailing EOS; show_tokens(ids) names them for error messages."""
    prompt_ids = tokenize(prompt)
    spans = []
    for sub in subprompts:
        sub_ids = tokenize(sub)[:-1]  # drop EOS
        if not sub_ids:
            raise ValueError(f"sub-prompt {sub!r} has no tokens")
        start = find_span(prompt_ids, sub_ids)
        if start is None:
            shown = show_tokens(prompt_ids) if show_tokens else prompt_ids
            sub_shown = show_tokens(sub_ids) if show_tokens else sub_ids
            raise ValueError(f"sub-prompt {sub!r} is not in the prompt {prompt!r}: its T5 tokens {sub_shown} do not "
                             f"appear contiguously in the prompt's tokens {shown}")
        end = start + len(sub_ids)
        if end > max_length:
            raise ValueError(f"sub-prompt {sub!r} spans T5 tokens {start}..{end - 1}, past the {max_length}-token "
                             "truncation of the prompt: shorten the prompt or move the sub-prompt earlier")
        spans.append((start, end))
    return spans


def span_scales(spans: Sequence[Span], alphas: Sequence[float | None], max_length: int = 512) -> torch.Tensor:
    """-> (max_length,) fp32: each token's product of the alphas of the spans holding it, 0 outside
    every span. An alpha of None leaves its span unselected (that slider is not acting)."""
    scale = torch.ones(max_length)
    selected = torch.zeros(max_length, dtype=torch.bool)
    for (start, end), alpha in zip(spans, alphas, strict=True):
        if alpha is not None:
            scale[start:end] *= alpha
            selected[start:end] = True
    return torch.where(selected, scale, 0.0)


def batch_span_scales(spans: Sequence[Sequence[Span]], alphas: Sequence[Sequence[float | None]],
                      max_length: int = 512) -> torch.Tensor:
    """-> (B, max_length) fp32, row b = span_scales(spans[b], alphas[b]): the STLoRA scales of a batch of
    prompts, as inference (SliderSchedule, per step) and training (the student's pass) set them."""
    return torch.stack([span_scales(s, a, max_length) for s, a in zip(spans, alphas, strict=True)])


def subprompt_token_scales(prompt: str, subprompts: Sequence[str], alphas: Sequence[float],
                           tokenize: Callable[[str], list[int]], max_length: int = 512,
                           show_tokens: Callable[[list[int]], list[str]] | None = None) -> torch.Tensor:
    """-> (max_length,) fp32 per-token slider scales of one prompt (spans, then their alphas)."""
    if len(subprompts) != len(alphas):
        raise ValueError(f"subprompts_list has {len(subprompts)} entries but slider_alpha_list has {len(alphas)}: "
                         "give one alpha per sub-prompt")
    for sub, alpha in zip(subprompts, alphas):
        if not is_number(alpha) or not math.isfinite(alpha):
            raise ValueError(f"slider alpha for sub-prompt {sub!r} must be a finite number, got {alpha!r}")
    return span_scales(subprompt_spans(prompt, subprompts, tokenize, max_length, show_tokens), alphas, max_length)


def is_number(value: object) -> bool:
    """A real number (int, float, NumPy scalar), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
