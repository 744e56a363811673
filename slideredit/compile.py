"""torch.compile for the transformer's repeated blocks, stable under slider changes.

Regional compilation: each double and single block is compiled with `nn.Module.compile` (the blocks
of a kind share one graph, so warm-up compiles two graphs however deep the model is); the embeddings,
RoPE table and final layer stay eager. Sliders never recompile a block when their alphas, sub-prompts
or per-image alphas change: inside the graph a SliderLinear reads each adapter's scale tensor
(`Adapter.scale`, written in place by set_slider_scale, zeros when the adapter is off) and A, B stacked
by a pre-hook before each call of the model (outside the graph, which cannot see an in-place change of
A or B: sliders.AdapterStack), so the graph depends only on which adapters are loaded and scaled and on
the shapes (batch, tokens), never on the scales' values. The eager "skip adapters whose scales are all
zero" is a data-dependent branch and is left out of the graph: the kernel masks a zero scale to an exact 0.
"""
from __future__ import annotations

import torch

from .sliders import slider_layers
from .transformer import Flux


_REFRESH_HOOK = "_compiled_stack_refresh"  # the model's attribute holding the pre-hook's handle


def compile_blocks(model: Flux, **options) -> Flux:
    """Compile every double and single block of `model` in place; `options` go to torch.compile
    (e.g. mode="max-autotune"). Returns the model."""
    if getattr(model, _REFRESH_HOOK, None) is None:
        setattr(model, _REFRESH_HOOK, model.register_forward_pre_hook(_refresh_compiled_stacks))
    for block in [*model.double_blocks, *model.single_blocks]:
        block.compile(**options)
    return model


def _refresh_compiled_stacks(model: Flux, args: tuple) -> None:
    """Before each call, outside the graph: restack A, B of every slider layer whose adapters changed
    since the last call (one scaled for the first time, added, or written in place by copy_ or an
    optimizer step, which the graph cannot see). A layer whose adapters did not change returns at once."""
    for _, layer in slider_layers(model):
        layer.refresh_compiled_stack()


def uncompile_blocks(model: Flux) -> Flux:
    """Undo compile_blocks: every block runs eagerly again (nn.Module.compile keeps the compiled call in
    `_compiled_call_impl`; None is its uncompiled state)."""
    for block in [*model.double_blocks, *model.single_blocks]:
        block._compiled_call_impl = None
    hook = getattr(model, _REFRESH_HOOK, None)
    if hook is not None:
        hook.remove()
        setattr(model, _REFRESH_HOOK, None)
    return model
