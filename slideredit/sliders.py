"""SliderEdit's adapters on the FLUX transformer: low-rank updates with per-token slider scales.

A targeted linear becomes a `SliderLinear`: the same frozen weight and bias plus any number of named
adapters, all applied in ONE call of the fused masked LoRA linear (kernels/), stacked along the rank:

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
from collections.abc import Iterator
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
    """The LoRA parts one named adapter puts on one layer, and its current per-token scale."""

    def __init__(self, parts: dict[str, LoRAPart]):
        super().__init__()
        self.parts = nn.ModuleDict(sorted(parts.items(), key=lambda kv: kv[1].start))  # q, k, v order
        self.scale: Tensor | None = None  # broadcastable to x.shape[:-1]; None = off (0)
        # The same scale for compiled blocks: a persistent fp32 tensor written in place (zeros when
        # off), so that new alphas are new values of the same graph input, never a new graph.
        # None until the adapter is first scaled.
        self.scale_buffer: Tensor | None = None

    @property
    def rank(self) -> int:
        return sum(p.lora_A.shape[0] for p in self.parts.values())

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


class SliderLinear(nn.Module):
    """A frozen linear plus named adapters, computed by one fused masked LoRA call.

    Inference reuses the stacked A, B and token scales between calls: they are rebuilt only when what
    they are made of changes (the set of switched-on adapters, a scale tensor, a LoRA parameter updated
    in place, e.g. by an optimizer step, or swapped, e.g. by `.to()`; x's device, dtype or token shape).
    An adapter whose scales are all zero is skipped, so with every adapter off or at zero the layer is
    exactly the module it replaced (`nn.Linear`, or `Fp8Linear` for fp8 weights). When autograd records
    (grad enabled and a LoRA parameter requires grad) the stack is built inside the graph on every call
    and nothing is skipped: every LoRA parameter gets its gradient, zero included, as without a cache.

    Inside torch.compile (slideredit/compile.py) the layer takes a graph-safe path instead: every
    adapter that was ever scaled is applied with its `scale_buffer` (zeros when off; the kernel's hard
    mask makes a zero scale add exactly 0), its A and B stacked beforehand by `refresh_compiled_stack`
    (outside the graph), so no branch depends on the values of the scales."""

    def __init__(self, base: nn.Linear | Fp8Linear):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same tensors: no copy, exact restore
        self.weight_scale = getattr(base, "weight_scale", None)  # fp8 weights: fp32 per output row
        self.adapters = nn.ModuleDict()
        # (key, sources, stack): `key` identifies what `stack` was built from; `sources` keeps those
        # objects alive so that their ids cannot be reused while the key holds them. stack is None
        # when every switched-on adapter has all-zero scales.
        self._cache: tuple[tuple, list, tuple[Tensor, Tensor, Tensor] | None] | None = None
        # Compiled blocks: A (K*r, d_in), B (d_out, K*r) of the adapters with a scale_buffer, in order,
        # and what they were built from (read outside the graph only); None = build them in the graph.
        self._compiled_ab: tuple[Tensor, Tensor] | None = None
        self._compiled_key: tuple | None = None
        self._compiled_sources: list = []

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

    def _base(self, x: Tensor) -> Tensor:
        """The frozen layer alone, as the replaced module computes it."""
        if self.weight_scale is None:
            return nn.functional.linear(x, self.weight, self.bias)
        return fp8_linear(x, self.weight, self.weight_scale, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return self._compiled_forward(x)
        on = [a for a in self.adapters.values() if a.scale is not None]
        if on and torch.is_grad_enabled() and any(p.requires_grad for a in on for p in a.parameters()):
            return self._lora(x, *self._stack(on, x))
        stack = self._cached_stack(on, x) if on else None
        if stack is None:
            return self._base(x)
        return self._lora(x, *stack)

    def _compiled_forward(self, x: Tensor) -> Tensor:
        """The graph-safe path: the graph depends on which adapters were ever scaled (and the shapes of
        their scale buffers), never on the scales' values."""
        scaled = [a for a in self.adapters.values() if a.scale_buffer is not None]
        if not scaled:
            return self._base(x)
        training = torch.is_grad_enabled() and any(p.requires_grad for a in scaled for p in a.parameters())
        if training or self._compiled_ab is None:
            lora_a, lora_b = self._stack_ab(scaled)
        else:
            lora_a, lora_b = self._compiled_ab
        token_scale = torch.stack(torch.broadcast_tensors(*[a.scale_buffer for a in scaled]), dim=-1)
        # the PyTorch formulation, which inductor fuses (the Triton kernel and the auto-dispatch's
        # measurements are not traceable)
        return self._lora(x, lora_a, lora_b, token_scale, backend="torch")

    def refresh_compiled_stack(self) -> None:
        """Stack A and B of the adapters with a scale buffer for the compiled path, once per change of
        what they are made of (run outside the graph: slideredit.compile calls it before each call of the
        model)."""
        scaled = [a for a in self.adapters.values() if a.scale_buffer is not None]
        sources = [s for a in scaled for s in (a, *a.parameters())]
        key = tuple((id(s), getattr(s, "_version", 0), s.data_ptr() if isinstance(s, Tensor) else 0) for s in sources)
        if key == self._compiled_key:
            return
        if scaled and not any(isinstance(s, Tensor) and s.is_inference() for s in sources):
            with torch.inference_mode(False), torch.no_grad():
                self._compiled_ab = self._stack_ab(scaled)
        else:
            self._compiled_ab = None  # nothing to stack, or no version counter to watch: stack in the graph
        self._compiled_key, self._compiled_sources = key, sources

    def _lora(self, x: Tensor, lora_a: Tensor, lora_b: Tensor, token_scale: Tensor,
              backend: str | None = None) -> Tensor:
        # the Triton kernel holds up to 128 stacked ranks; larger stacks take the PyTorch path
        backend = "torch" if lora_a.shape[0] > MAX_STACKED_RANK else backend
        fp8 = {} if self.weight_scale is None else {"weight_scale": self.weight_scale}
        return masked_lora_linear(x, self.weight, self.bias, lora_a, lora_b, token_scale, backend=backend, **fp8)

    def _stack_ab(self, adapters: list[Adapter]) -> tuple[Tensor, Tensor]:
        """-> A (K*r, d_in), B (d_out, K*r) of `adapters`, ranks padded to the largest (the kernel
        stacks equal ranks)."""
        rank = max(a.rank for a in adapters)
        stacks = [a.stacked(self.out_features, rank) for a in adapters]
        return torch.cat([s[0] for s in stacks]), torch.cat([s[1] for s in stacks], dim=1)

    def _stack(self, adapters: list[Adapter], x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> A (K*r, d_in), B (d_out, K*r), token scales (..., K) fp32 of `adapters`."""
        lora_a, lora_b = self._stack_ab(adapters)
        scales = torch.broadcast_tensors(*[a.scale for a in adapters])
        token_scale = torch.stack(scales, dim=-1).to(device=x.device, dtype=torch.float32)
        return lora_a, lora_b, token_scale

    def _cached_stack(self, adapters: list[Adapter], x: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        """The stack of the adapters with a non-zero scale, built once per change of its sources.

        Cached form: A and B already in x's dtype (the kernel casts them to it for its GEMMs anyway, so
        the result is the same) and the token scales expanded to x's tokens (..., K), contiguous."""
        sources: list = []
        for a in adapters:
            sources += [a, a.scale, *a.parameters()]
        if any(isinstance(s, Tensor) and s.is_inference() for s in sources):
            return self._live_stack(adapters, x)  # no version counter to watch: build for this call only
        key = (x.device, x.dtype, x.shape[:-1], *[(id(s), getattr(s, "_version", 0),
                                                    s.data_ptr() if isinstance(s, Tensor) else 0) for s in sources])
        if self._cache is not None and self._cache[0] == key:
            return self._cache[2]
        stack = self._live_stack(adapters, x)
        self._cache = (key, sources, stack)
        return stack

    def _live_stack(self, adapters: list[Adapter], x: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        """The cached form of the stack of the adapters with a non-zero scale (None if there are none)."""
        # inference_mode(False): a stack built under inference mode must still be usable by autograd
        # later (x requiring grad); no_grad: nothing here is differentiated.
        with torch.inference_mode(False), torch.no_grad():
            live = [a for a in adapters if bool(a.scale.any())]  # one sync per rebuild, not per call
            if not live:
                return None
            lora_a, lora_b, token_scale = self._stack(live, x)
            lead = (*x.shape[:-1], token_scale.shape[-1])
            return lora_a.to(x.dtype), lora_b.to(x.dtype), token_scale.expand(lead).contiguous()


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
    """Scale adapter `name` on every layer: a number applies to every token; a (B, T) tensor gives
    one scale per text token (STLoRA: text-stream layers only); None switches the adapter off.
    Layers keep their stacked adapters until a scale (or an adapter's weights) changes.

    Each adapter's scale is also written, in place, into its persistent `scale_buffer` (zeros for
    None), which compiled blocks read: a new value of the same shape never recompiles them."""
    on_device: dict[torch.device, Tensor] = {}  # one fp32 copy per device, shared by its layers
    written: set[int] = set()  # scale buffers (shared by the layers of one device) already updated
    fresh: dict[tuple, Tensor] = {}  # new buffers, one per device and shape, shared by the layers
    for _, layer in slider_layers(model):
        if name in layer.adapters:
            value = None
            if scale is not None:
                device = layer.weight.device
                if device not in on_device:
                    with torch.inference_mode(False):  # a tensor with a version counter: the cache watches it
                        t = torch.as_tensor(scale, dtype=torch.float32, device=device)
                        t = t.clone() if t.is_inference() else t
                    on_device[device] = t.reshape(1, 1) if t.ndim == 0 else t
                value = on_device[device]
            adapter = layer.adapters[name]
            adapter.scale = value
            _write_scale_buffer(adapter, value, written, fresh)


def _write_scale_buffer(adapter: Adapter, value: Tensor | None, written: set[int], fresh: dict[tuple, Tensor]) -> None:
    """adapter.scale_buffer <- value (zeros for None), in place when the shape and device still fit."""
    buffer = adapter.scale_buffer
    if buffer is not None and (value is None or (buffer.shape == value.shape and buffer.device == value.device)):
        if id(buffer) not in written:
            buffer.zero_() if value is None else buffer.copy_(value)
            written.add(id(buffer))
    elif value is not None:  # first scale, or a new shape (e.g. per-token after a number): a new buffer
        key = (value.device, value.shape)
        if key not in fresh:
            with torch.inference_mode(False):  # writable in place later, inside or outside inference mode
                fresh[key] = value.clone()
            written.add(id(fresh[key]))
        adapter.scale_buffer = fresh[key]


def adapter_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """{"<module>.<part>.lora_A": Parameter, ...} of one adapter, in module order."""
    out = {}
    for module_name, layer in slider_layers(model):
        if name in layer.adapters:
            for part_name, part in layer.adapters[name].parts.items():
                out[f"{module_name}.{part_name}.lora_A"] = part.lora_A
                out[f"{module_name}.{part_name}.lora_B"] = part.lora_B
    return out
