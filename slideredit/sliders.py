"""SliderEdit's adapters on the FLUX transformer: low-rank updates with per-token slider scales.

A targeted linear becomes a `SliderLinear`: the same frozen weight and bias plus any number of named
adapters, all applied in ONE call of the fused masked LoRA linear, stacked along the rank
(`AdapterStack`); `slideredit.kernels.masked_lora.masked_lora_reference` is the definition of the math:

    y = x W^T + b + sum_k s_k(t) * B_k (A_k x)

- GSTLoRA ("gstlora"): every double-block linear, and the q, k, v rows of every single block's
  `linear1`; s(t) = slider_alpha for every token.
- STLoRA ("stlora"): the text stream of the double blocks (`txt_attn.qkv`, `txt_attn.proj`, `txt_mlp.0`,
  `txt_mlp.2`); s(t) = the slider of the sub-prompt span holding text token t, 0 elsewhere.

An adapter on a fused projection may be several LoRAs (the release adapts q, k and v separately): each
`LoRAPart` owns an output-row range of the fused weight, and the parts stack into one adapter whose B is
block-structured. Removing the adapters puts back the original `nn.Linear` (or `Fp8Linear`) holding the
same tensors.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
import torch
from torch import Tensor, nn

from .kernels.masked_lora import MAX_STACKED_RANK, fp8_linear, masked_lora_linear

from .quantization import Fp8Linear
from .transformer import Flux

GSTLORA, STLORA = "gstlora", "stlora"


def gstlora_targets(model: Flux) -> list[str]:
    """Every double-block linear, and the single blocks' `linear1` (its q, k, v rows only)."""
    p = model.params
    targets = [f"double_blocks.{i}.{stream}_{layer}" for i in range(p.depth) for stream in ("img", "txt")
               for layer in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")]
    return targets + [f"single_blocks.{i}.linear1" for i in range(p.depth_single_blocks)]


def stlora_targets(model: Flux) -> list[str]:
    """The text stream of the double blocks: these layers only ever see the T5 tokens."""
    return [f"double_blocks.{i}.txt_{layer}" for i in range(model.params.depth)
            for layer in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")]


TARGETS = {GSTLORA: gstlora_targets, STLORA: stlora_targets}


def is_fused_qkv(module: str) -> bool:
    """Projections whose first 3 * hidden rows are [q ; k ; v]."""
    return module.endswith(("attn.qkv", "linear1"))


def part_rows(part: str, hidden: int, out_features: int) -> tuple[int, int]:
    """Output rows of a LoRA part: "q", "k", "v" or "qkv" of a fused projection, or "all" rows."""
    rows = {"q": (0, hidden), "k": (hidden, 2 * hidden), "v": (2 * hidden, 3 * hidden), "qkv": (0, 3 * hidden)}
    return rows.get(part, (0, out_features))


class LoRAPart(nn.Module):
    """One LoRA: A (r, d_in), B (rows, r), writing output rows [start, end) of the layer."""

    def __init__(self, lora_a: Tensor, lora_b: Tensor, start: int, end: int):
        super().__init__()
        self.lora_A = nn.Parameter(lora_a, requires_grad=False)
        self.lora_B = nn.Parameter(lora_b, requires_grad=False)
        self.start, self.end = start, end


class Adapter(nn.Module):
    """The LoRA parts one named adapter puts on one layer, and its scale s(t).

    The scale is one fp32 tensor broadcastable to the layer's tokens ((1, 1): one number, (B, 1): one per
    image, (B, T): one per text token), kept for the adapter's lifetime and written in place by each new
    value of the same shape and device: compiled blocks read it as a graph input, so new alphas are new
    values of that input, never a new graph. Switching the adapter off zeroes it and `scale` reads None."""

    def __init__(self, parts: dict[str, LoRAPart]):
        super().__init__()
        self.parts = nn.ModuleDict(sorted(parts.items(), key=lambda kv: kv[1].start))  # q, k, v order
        self._scale: Tensor | None = None  # None until first scaled; zeros while off
        self._on = False

    @property
    def rank(self) -> int:
        return sum(p.lora_A.shape[0] for p in self.parts.values())

    @property
    def device(self) -> torch.device:
        return next(iter(self.parts.values())).lora_A.device

    @property
    def scale(self) -> Tensor | None:
        """The per-token scale (fp32, on the adapter's device), None while the adapter is off."""
        return self._scale if self._on else None

    @scale.setter
    def scale(self, value: float | Tensor | None) -> None:
        with torch.no_grad():
            if value is None:
                if self._scale is not None:
                    self._scale.zero_()  # what compiled blocks read while the adapter is off
            else:
                self._write_scale(torch.as_tensor(value, dtype=torch.float32))
        self._on = value is not None

    def _write_scale(self, value: Tensor) -> None:
        value = value.reshape(1, 1) if value.ndim == 0 else value
        if self._scale is not None and self._scale.shape == value.shape and self._scale.device == self.device:
            self._scale.copy_(value)
        else:  # first scale, a new shape (e.g. per token after a number) or a new device: a new tensor
            with torch.inference_mode(False):  # writable in place later, inside or outside inference mode
                self._scale = value.to(self.device, copy=True)

    def stacked(self, d_out: int, rank: int) -> tuple[Tensor, Tensor]:
        """-> A (rank, d_in), B (d_out, rank): parts side by side, zero-padded up to `rank`."""
        parts = list(self.parts.values())
        a = torch.cat([p.lora_A for p in parts])
        b = a.new_zeros(d_out, rank)
        col = 0
        for p in parts:
            r = p.lora_A.shape[0]
            b[p.start:p.end, col:col + r] = p.lora_B
            col += r
        if rank > col:
            a = torch.cat([a, a.new_zeros(rank - col, a.shape[1])])
        return a, b


def _fingerprint(sources: list, *extra) -> tuple | None:
    """A key that changes whenever a stack built from `sources` would: each object's identity and, for
    tensors, their storage (swapped by `.data =`, `.to()`) and version counter (bumped by every in-place
    write: copy_, an optimizer step), after `extra`. None if a tensor was made under inference mode: it has
    no version counter to watch."""
    if any(isinstance(s, Tensor) and s.is_inference() for s in sources):
        return None
    return (*extra, *[(id(s), s._version, s.data_ptr()) if isinstance(s, Tensor) else id(s) for s in sources])


class _Cached:
    """A value and the fingerprint of what it was built from: rebuilt when the fingerprint changes (on
    every use when there is none)."""

    def __init__(self):
        self.value = None
        self._key: tuple | None = None
        self._sources: list = []  # the fingerprinted objects, kept alive: no new object takes their ids

    def get(self, sources: list, extra: tuple, build: Callable[[], object]):
        key = _fingerprint(sources, *extra)
        if key is None or key != self._key:
            self.value, self._key, self._sources = build(), key, sources
        return self.value


def _records_grad(adapters: list[Adapter]) -> bool:
    return torch.is_grad_enabled() and any(p.requires_grad for a in adapters for p in a.parameters())


def _ever_scaled(adapters: list[Adapter]) -> list[Adapter]:
    """The adapters compiled blocks apply, whatever their values: those scaled at least once (an adapter's
    scale tensor outlives switching it off, as zeros)."""
    return [a for a in adapters if a._scale is not None]


def _stack_scales(scales: list[Tensor]) -> Tensor:
    """(..., K): the K adapters' scales side by side, broadcast to one shape."""
    return torch.stack(torch.broadcast_tensors(*scales), dim=-1)


# What SliderLinear hands the kernel: A (K*r, d_in), B (d_out, K*r), token scales (..., K) and what the
# kernel's PyTorch path needs for its hard mask (masked_lora_linear's zero_scale): token scales == 0, False
# when none is 0, None to compare on every call.
Stack = tuple[Tensor, Tensor, Tensor, Tensor | bool | None]


class AdapterStack:
    """One layer's adapters as the kernel takes them, kept between calls.

    The K adapters sit side by side along the rank: A (K*r, d_in), B (d_out, K*r), ranks zero-padded to
    the largest (the kernel stacks equal ranks); token scales (..., K) fp32 hold each token's K scales;
    zero scales (`Stack`) tell the kernel's PyTorch path where its hard mask applies.
    A kept stack is rebuilt only when what it was built from changes (`_fingerprint`: the adapters, their
    scale tensors and LoRA tensors, where an optimizer step's in-place write counts as a change; x's
    device, dtype and token shape).
    - Eager inference (`for_call`): only the adapters whose scale is not all zero (a zero scale adds exactly
      0: with none left the layer is exactly its base linear), A and B in x's dtype (the kernel casts them
      so for its GEMMs anyway), the scales expanded to x's tokens, and token scales == 0 beside them, or
      False when no scale is 0 (a call then costs 3 ops beyond the base linear on the PyTorch path: 4
      with the hard mask).
    - Training (autograd records): `restack` on every call, inside the graph and zero scales included, so
      that every LoRA parameter of a switched-on adapter gets its gradient.
    - Compiled blocks (`for_graph`): every adapter ever scaled, whatever its values, so that the graph
      never depends on them: their persistent scale tensors (zeros when off) are read in the graph, A and
      B are stacked outside it by `refresh_for_graph` before each call of the model (slideredit.compile's
      pre-hook: the graph cannot see an in-place change of A or B).
    """

    def __init__(self, out_features: int):
        self.out_features = out_features
        self._call = _Cached()  # eager inference: the Stack, None when every scale is zero
        self._graph = _Cached()  # compiled blocks: (A, B); None until refreshed (then stacked in the graph)

    def for_call(self, adapters: list[Adapter], x: Tensor) -> Stack | None:
        """The stack for an eager call on x, or None when no adapter adds anything."""
        on = [a for a in adapters if a.scale is not None]
        if not on:
            return None
        if _records_grad(on):
            return *self.restack(on, x), None
        sources = [s for a in on for s in (a, a.scale, *a.parameters())]
        return self._call.get(sources, (x.device, x.dtype, x.shape[:-1]), lambda: self._inference_stack(on, x))

    def restack(self, adapters: list[Adapter], x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(A, B, token scales) of `adapters` built anew (differentiable in A and B)."""
        lora_a, lora_b = self._stack_ab(adapters)
        return lora_a, lora_b, _stack_scales([a.scale for a in adapters]).to(x.device)

    def _inference_stack(self, on: list[Adapter], x: Tensor) -> Stack | None:
        # inference_mode(False): a stack built under inference mode must still be usable by autograd
        # later (x requiring grad); no_grad: nothing here is differentiated.
        with torch.inference_mode(False), torch.no_grad():
            nonzero = torch.stack([torch.count_nonzero(a.scale) for a in on]).tolist()  # one sync per rebuild
            live = [a for a, n in zip(on, nonzero) if n]
            if not live:
                return None
            lora_a, lora_b, token_scale = self.restack(live, x)
            token_scale = token_scale.expand(*x.shape[:-1], len(live)).contiguous()
            masked = any(n < a.scale.numel() for a, n in zip(on, nonzero) if n)  # a live adapter with a 0
            return lora_a.to(x.dtype), lora_b.to(x.dtype), token_scale, (token_scale == 0) if masked else False

    def refresh_for_graph(self, adapters: list[Adapter]) -> None:
        """Outside the graph: restack A and B of the adapters ever scaled if they changed since the last call."""
        scaled = _ever_scaled(adapters)
        sources = [s for a in scaled for s in (a, *a.parameters())]
        with torch.inference_mode(False), torch.no_grad():
            self._graph.get(sources, (), lambda: self._stack_ab(scaled) if scaled else None)

    def for_graph(self, adapters: list[Adapter]) -> Stack | None:
        """The stack inside torch.compile: depends on which adapters were ever scaled (and the shapes of
        their scales), never on the scales' values (so the kernel compares them with 0 in the graph); None
        when none was."""
        scaled = _ever_scaled(adapters)
        if not scaled:
            return None
        if _records_grad(scaled) or self._graph.value is None:
            lora_a, lora_b = self._stack_ab(scaled)
        else:
            lora_a, lora_b = self._graph.value
        return lora_a, lora_b, _stack_scales([a._scale for a in scaled]), None

    def _stack_ab(self, adapters: list[Adapter]) -> tuple[Tensor, Tensor]:
        rank = max(a.rank for a in adapters)
        stacks = [a.stacked(self.out_features, rank) for a in adapters]
        return torch.cat([a for a, _ in stacks]), torch.cat([b for _, b in stacks], dim=1)


class SliderLinear(nn.Module):
    """A frozen linear plus named adapters, y = x W^T + b + sum_k s_k(t) B_k (A_k x), whose definition is
    `slideredit.kernels.masked_lora.masked_lora_reference`. A call stacks the adapters (`AdapterStack`)
    and runs the fused masked LoRA linear once. With every adapter off or at zero the layer is exactly
    the module it replaced (`nn.Linear`, or `Fp8Linear` for fp8 weights)."""

    def __init__(self, base: nn.Linear | Fp8Linear):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same tensors: no copy, exact restore
        self.weight_scale = getattr(base, "weight_scale", None)  # fp8 weights: fp32 per output row
        self.adapters = nn.ModuleDict()
        self._stack = AdapterStack(self.out_features)

    def to_linear(self) -> nn.Linear | Fp8Linear:
        """The layer this one replaced (nn.Linear, or Fp8Linear for fp8 weights), holding the same tensors."""
        with torch.device("meta"):
            if self.weight_scale is None:
                linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
            else:
                linear = Fp8Linear(self.in_features, self.out_features, bias=self.bias is not None)
                linear.weight_scale = self.weight_scale
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def forward(self, x: Tensor) -> Tensor:
        """x W^T + b + sum_k s_k(t) B_k (A_k x) (masked_lora_reference): stack the adapters, call the kernel."""
        adapters = list(self.adapters.values())
        if torch.compiler.is_compiling():  # the PyTorch path, which inductor fuses (Triton is not traceable)
            stack, backend = self._stack.for_graph(adapters), "torch"
        else:
            stack, backend = self._stack.for_call(adapters, x), None
        return self._base(x) if stack is None else self._lora(x, *stack, backend=backend)

    def refresh_compiled_stack(self) -> None:
        """Restack A and B for compiled blocks if the adapters changed: outside the graph, before each call
        of the model (slideredit.compile's pre-hook)."""
        self._stack.refresh_for_graph(list(self.adapters.values()))

    def _base(self, x: Tensor) -> Tensor:
        """The frozen layer alone, as the replaced module computes it."""
        if self.weight_scale is None:
            return nn.functional.linear(x, self.weight, self.bias)
        return fp8_linear(x, self.weight, self.weight_scale, self.bias)

    def _lora(self, x: Tensor, lora_a: Tensor, lora_b: Tensor, token_scale: Tensor,
              zero_scale: Tensor | bool | None = None, backend: str | None = None) -> Tensor:
        # the Triton kernel holds up to 128 stacked ranks; larger stacks take the PyTorch path
        backend = "torch" if lora_a.shape[0] > MAX_STACKED_RANK else backend
        return masked_lora_linear(x, self.weight, self.bias, lora_a, lora_b, token_scale, backend=backend,
                                  weight_scale=self.weight_scale, zero_scale=zero_scale)


# ---------------------------------------------------------------------------------------------------
# Putting adapters on a model, scaling them, taking them off
# ---------------------------------------------------------------------------------------------------

def slider_layers(model: nn.Module) -> Iterator[tuple[str, SliderLinear]]:
    return ((name, m) for name, m in model.named_modules() if isinstance(m, SliderLinear))


def add_adapter(model: Flux, name: str, weights: dict[str, dict[str, tuple[Tensor, Tensor]]],
                trainable: bool = False) -> None:
    """Attach adapter `name` to `model`. weights[module][part] = (A, B), part one of "q", "k", "v",
    "qkv", "all" (already checked by the loader). Replaces an adapter of the same name."""
    hidden = model.params.hidden_size
    for module_name, parts in weights.items():
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = getattr(parent, child)
        if not isinstance(layer, SliderLinear):
            layer = SliderLinear(layer)
            setattr(parent, child, layer)
        device = layer.weight.device
        adapter = Adapter({part: LoRAPart(a.to(device), b.to(device), *part_rows(part, hidden, layer.out_features))
                           for part, (a, b) in parts.items()})
        adapter.requires_grad_(trainable)
        layer.adapters[name] = adapter


def init_adapter(model: Flux, name: str, rank: int, generator: torch.Generator | None = None) -> None:
    """Attach a fresh trainable adapter as the release initialises it: B = 0 (so training starts from
    the base model); A ~ N(0, 1/r) for GSTLoRA, kaiming-uniform (a = sqrt(5)) for STLoRA. fp32."""
    hidden = model.params.hidden_size
    weights = {}
    for module in TARGETS[name](model):
        layer = model.get_submodule(module)
        parts = ("q", "k", "v") if is_fused_qkv(module) else ("all",)
        weights[module] = {}
        for part in parts:
            start, end = part_rows(part, hidden, layer.out_features)
            a = torch.empty(rank, layer.in_features)
            if name == GSTLORA:
                a.normal_(0, 1 / rank, generator=generator)
            else:  # kaiming_uniform_(a=sqrt(5)) == uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))
                bound = 1 / math.sqrt(layer.in_features)
                a.uniform_(-bound, bound, generator=generator)
            weights[module][part] = (a, torch.zeros(end - start, rank))
    add_adapter(model, name, weights, trainable=True)


def remove_adapters(model: nn.Module, names: tuple[str, ...] | None = None) -> None:
    """Remove the named adapters (all when None); a layer left with none becomes its nn.Linear again."""
    for module_name, layer in list(slider_layers(model)):
        for name in list(layer.adapters):
            if names is None or name in names:
                del layer.adapters[name]
        if not layer.adapters:
            parent_name, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer.to_linear())


def loaded_adapters(model: nn.Module) -> set[str]:
    return {name for _, layer in slider_layers(model) for name in layer.adapters}


def set_slider_scale(model: nn.Module, name: str, scale: float | Tensor | None) -> None:
    """Scale adapter `name` on every layer: a number applies to every token; a (B, 1) tensor one per
    image; a (B, T) tensor one per text token (STLoRA: text-stream layers only); None switches the adapter
    off. The value is copied into each adapter's scale tensor (`Adapter.scale`), in place when its shape
    is unchanged: compiled blocks never recompile for new values. Layers keep their stacked adapters
    until a scale (or an adapter's weights) changes."""
    adapters = [layer.adapters[name] for _, layer in slider_layers(model) if name in layer.adapters]
    if scale is not None and adapters:  # converted once, on the layers' device, not once per layer
        scale = torch.as_tensor(scale, dtype=torch.float32, device=adapters[0].device)
    for adapter in adapters:
        adapter.scale = scale


def adapter_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """{"<module>.<part>.lora_A": Parameter, ...} of one adapter, in module order."""
    out = {}
    for module_name, layer in slider_layers(model):
        if name in layer.adapters:
            for part_name, part in layer.adapters[name].parts.items():
                out[f"{module_name}.{part_name}.lora_A"] = part.lora_A
                out[f"{module_name}.{part_name}.lora_B"] = part.lora_B
    return out
