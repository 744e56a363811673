"""Slider alphas across a batch and along the denoising trajectory: what scale each adapter has at a step.

A slider's alpha is given in one of three forms:
- a number: every image of the batch, every step;
- a list (or tuple) with one number per image of the batch: one call renders several strengths;
- a callable alpha(step_index, sigma) -> number, asked at every step it acts on (sigma in [1, 0]).
GSTLoRA has one alpha (`slider_alpha`); STLoRA has one per sub-prompt (`slider_alpha_list`, whose
entries each take one of the forms).

`slider_steps` = (start, end), fractions of the denoising steps, default (0, 1): step i of n acts when
start <= i / n < end, so (0.2, 1) over 10 steps skips steps 0 and 1. A list of such pairs gives one
window per STLoRA sub-prompt. Outside its window a slider does not act: a GSTLoRA is off (exactly the
base layer), an STLoRA sub-prompt's span is unselected (an overlapping slider then acts alone there).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .sliders import GSTLORA, STLORA
from .token_selection import Span, batch_span_scales, is_number

AlphaFn = Callable[[int, float], float]
Alpha = float | Sequence[float] | AlphaFn
Window = tuple[float, float]
ALPHA_WARN = 10.0  # sweeps use [-1, 1] and the release validates on [-1.5, 1.5]; far beyond is noise


class AlphaRangeWarning(UserWarning):
    """An alpha beyond |alpha| > ALPHA_WARN (infer.py warns once itself and silences these)."""


def check_alpha(value: object, what: str) -> float:
    """A finite number; warns beyond |alpha| > 10."""
    if not is_number(value) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    if abs(value) > ALPHA_WARN:
        warnings.warn(f"{what} = {value} is far outside the range sliders are trained for (sweeps use [-1, 1], "
                      f"the release validates on [-1.5, 1.5]); beyond |alpha| > {ALPHA_WARN:g} the edit is "
                      "usually noise", AlphaRangeWarning, stacklevel=4)
    return float(value)


def normalise_alpha(value: object, what: str) -> float | list[float] | AlphaFn:
    """Check one slider's alpha and bring it to a float, a list of floats (per image) or a callable."""
    if callable(value):
        return value
    if hasattr(value, "tolist") and not is_number(value):  # NumPy arrays, tensors
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{what} is an empty list: give one alpha per image of the batch")
        return [check_alpha(v, f"{what}[{i}]") for i, v in enumerate(value)]
    return check_alpha(value, what)


def alpha_batch(alphas: Sequence[object]) -> int | None:
    """The batch size the per-image alpha lists among `alphas` ask for (None when there are none);
    they must agree."""
    lengths = set()
    for alpha in alphas:
        if hasattr(alpha, "tolist") and not is_number(alpha):  # NumPy arrays, tensors
            alpha = alpha.tolist()
        if isinstance(alpha, (list, tuple)):
            lengths.add(len(alpha))
    if len(lengths) > 1:
        raise ValueError(f"per-image alpha lists have different lengths {sorted(lengths)}: each gives one alpha "
                         "per image of the batch, so they must all have the batch's length")
    return lengths.pop() if lengths else None


def check_windows(slider_steps: object, num_subprompts: int | None, has_gstlora: bool) -> list[Window]:
    """-> one (start, end) window per STLoRA sub-prompt, or a single window for every slider."""
    if slider_steps is None:
        return [(0.0, 1.0)]
    pairs = list(slider_steps) if isinstance(slider_steps, (list, tuple)) else None
    if pairs is not None and pairs and not all(is_number(p) for p in pairs):  # a list of pairs
        if num_subprompts is None or has_gstlora:
            raise ValueError("a list of (start, end) pairs in slider_steps gives one window per STLoRA sub-prompt; "
                             "with slider_alpha (GSTLoRA) give one (start, end) pair for every slider")
        if len(pairs) != num_subprompts:
            raise ValueError(f"slider_steps has {len(pairs)} (start, end) pairs for {num_subprompts} sub-prompts")
        return [_window(p, f"slider_steps[{i}]") for i, p in enumerate(pairs)]
    return [_window(slider_steps, "slider_steps")]


def _window(pair: object, what: str) -> Window:
    if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(is_number(v) for v in pair)):
        raise ValueError(f"{what} must be a (start, end) pair of fractions of the denoising steps, got {pair!r}")
    start, end = float(pair[0]), float(pair[1])
    if not 0 <= start < end <= 1:
        raise ValueError(f"{what} = ({start:g}, {end:g}): need 0 <= start < end <= 1 (fractions of the steps)")
    return start, end


def acts(window: Window, step: int, num_steps: int) -> bool:
    return window[0] <= step / num_steps < window[1]


class SliderSchedule:
    """The adapter scales of one edit at each step: GSTLoRA (number or (B, 1)), STLoRA (B, T) or None (off).

    subprompts and spans[b] (image b's sub-prompt spans) are given for an STLoRA. Unchanged alphas
    give the very same tensors back; scales_to_set hands out, step by step, only the scales that changed."""

    def __init__(self, batch: int, num_steps: int, max_length: int, windows: list[Window],
                 slider_alpha: object = None, subprompts: Sequence[str] | None = None,
                 spans: list[list[Span]] | None = None, slider_alpha_list: Sequence[object] | None = None):
        self.batch, self.num_steps, self.max_length = batch, num_steps, max_length
        self.windows, self.subprompts, self.spans = windows, subprompts, spans
        self.gstlora = None if slider_alpha is None else self._gstlora_alpha(slider_alpha)
        self.stlora = None if slider_alpha_list is None else self._stlora_alphas(slider_alpha_list)
        self._key, self._scales = None, (None, None)
        self._set: dict[str, float | Tensor | None] = {}  # the scales last handed out by scales_to_set

    def update(self, slider_alpha: object = None, slider_alpha_list: object = None) -> None:
        """New alphas from the next step on (how a step-end callback moves the sliders of the call)."""
        if slider_alpha is not None:
            if self.gstlora is None:
                raise ValueError("a callback can move the GSTLoRA slider only when the call gave slider_alpha")
            self.gstlora = self._gstlora_alpha(slider_alpha)
        if slider_alpha_list is not None:
            if self.stlora is None:
                raise ValueError("a callback can move STLoRA sliders only when the call gave subprompts_list")
            self.stlora = self._stlora_alphas(slider_alpha_list)

    def _gstlora_alpha(self, alpha: object) -> float | list[float] | AlphaFn:
        return self._batched(normalise_alpha(alpha, "slider_alpha"))

    def _stlora_alphas(self, alphas: object) -> list[float | list[float] | AlphaFn]:
        alphas = list(alphas)
        if len(alphas) != len(self.subprompts):
            raise ValueError(f"subprompts_list has {len(self.subprompts)} entries but slider_alpha_list has "
                             f"{len(alphas)}: give one alpha per sub-prompt")
        return [self._batched(normalise_alpha(a, f"slider alpha for sub-prompt {sub!r}"))
                for sub, a in zip(self.subprompts, alphas)]

    def _batched(self, alpha: float | list[float] | AlphaFn) -> float | list[float] | AlphaFn:
        if isinstance(alpha, list) and len(alpha) != self.batch:
            raise ValueError(f"per-image alphas {alpha} do not match the batch of {self.batch} images")
        return alpha

    def scales(self, step: int, sigma: float) -> tuple[float | Tensor | None, Tensor | None]:
        gst = None
        if self.gstlora is not None and acts(self.windows[0], step, self.num_steps):
            gst = self._per_image(self.gstlora, step, sigma, "slider_alpha")
        st = None
        if self.stlora is not None:
            windows = self.windows * len(self.stlora) if len(self.windows) == 1 else self.windows
            st = tuple(self._per_image(a, step, sigma, f"slider_alpha_list[{k}]") if acts(w, step, self.num_steps)
                       else None for k, (a, w) in enumerate(zip(self.stlora, windows)))
        key = (gst, st)
        if key != self._key:
            self._key, self._scales = key, (self._gstlora_scale(gst), self._stlora_scale(st))
        return self._scales

    def scales_to_set(self, step: int, sigma: float, *, negative_pass: bool = False
                      ) -> dict[str, float | Tensor | None]:
        """{adapter name: scale} to set before a model call at this step, holding only the scales that changed
        since the previous call (setting an unchanged scale again would make every layer restack its adapters).
        The first call names both adapters, so one the call does not use is switched off (None).

        negative_pass: true CFG's pass on the negative prompt, where the STLoRA is off (its spans are tokens
        of the positive prompt) and the GSTLoRA keeps its alpha (it changes the model, not a prompt)."""
        gst, st = self.scales(step, sigma)
        wanted = {GSTLORA: gst, STLORA: None if negative_pass else st}
        changed = {name: scale for name, scale in wanted.items()
                   if name not in self._set or self._set[name] is not scale}
        self._set.update(changed)
        return changed

    def _per_image(self, alpha: float | list[float] | AlphaFn, step: int, sigma: float, what: str
                   ) -> float | tuple[float, ...]:
        if callable(alpha):
            return check_alpha(alpha(step, sigma), f"{what}({step}, {sigma:.4f})")
        return tuple(alpha) if isinstance(alpha, list) else alpha

    def _gstlora_scale(self, gst: float | tuple[float, ...] | None) -> float | Tensor | None:
        if isinstance(gst, tuple):
            return torch.tensor(gst, dtype=torch.float32).reshape(self.batch, 1)  # broadcasts over tokens
        return gst

    def _stlora_scale(self, st: tuple | None) -> Tensor | None:
        if st is None or all(a is None for a in st):
            return None  # no sub-prompt acting at this step: the adapter is off
        alphas = [[a[b] if isinstance(a, tuple) else a for a in st] for b in range(self.batch)]  # image b's alphas
        return batch_span_scales(self.spans, alphas, self.max_length)
