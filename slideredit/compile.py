"""torch.compile for the transformer's repeated blocks, stable under slider changes.

Regional compilation: each double and single block is compiled with `nn.Module.compile` (the blocks
of a kind share one graph, so warm-up compiles two graphs however deep the model is); the embeddings,
RoPE table and final layer stay eager. Sliders never recompile a block when their alphas, sub-prompts
or per-image alphas change: inside the graph a SliderLinear reads each adapter's persistent
`scale_buffer` (written in place by set_slider_scale, zeros when the adapter is off) and A, B stacked
beforehand, so the graph depends only on which adapters are loaded and scaled and on the shapes (batch,
tokens), never on the scales' values. The eager "skip adapters whose scales are all zero" is a
data-dependent branch and is left out of the graph: a zero scale is masked to an exact 0 by the kernel.
"""
from __future__ import annotations

import torch

from .sliders import slider_layers
from .transformer import Flux


def compile_blocks(model: Flux, **options) -> Flux:
    """Compile every double and single block of `model` in place; `options` go to torch.compile
    (e.g. mode="max-autotune"). Returns the model."""
    model.compiled_sliders = True  # set_slider_scale now also restacks A, B for the compiled path
    for layer in (layer for _, layer in slider_layers(model)):
        layer.refresh_compiled_stack()
    for block in [*model.double_blocks, *model.single_blocks]:
        block.compile(**options)
    return model


def uncompile_blocks(model: Flux) -> Flux:
    """Undo compile_blocks: every block runs eagerly again (nn.Module.compile keeps the compiled call in
    `_compiled_call_impl`; None is its uncompiled state)."""
    for block in [*model.double_blocks, *model.single_blocks]:
        block._compiled_call_impl = None
    model.compiled_sliders = False
    return model
