"""fp8 weights: float8_e4m3fn with one fp32 scale per output row, for the transformer's block linears.

    W[i, :] ~= weight[i, :] * weight_scale[i]      weight float8_e4m3fn (d_out, d_in), weight_scale fp32 (d_out,)

Quantization (`quantize_rows`): scale = max |W[i, :]| / 448 (448 is e4m3's largest finite value), then
weight = round-to-nearest(W / scale), clamped to [-448, 448] first (torch's cast would turn anything
beyond into NaN). A row of zeros gets scale 1. Non-finite weights are an error, never a NaN scale.

Error bound (e4m3 has 3 mantissa bits): for |W / scale| in the normal range [2^-6, 448], the element's
relative error is at most 2^-4 (half a step of 2^-3 relative to the leading power of two), plus the fp32
rounding of the division (2^-24); below 2^-6 * scale (subnormals) the absolute error is at most
2^-10 * scale. For weights whose mantissas are spread evenly, the RMS relative error per element is about
2^-3 / sqrt(12) * sqrt(1/2) = 2.6 %, and so is a linear layer's output error (independent errors add up
in quadrature, as the signal does).

Already-quantized checkpoints (`split_stored_scales`) follow ComfyUI's conventions (Comfy-Org/ComfyUI,
comfy/utils.py `convert_old_quants` and comfy/quant_ops.py `TensorCoreFP8Layout`, v0.19): a layer's
`weight` is float8_e4m3fn, its per-tensor fp32 scale is `<layer>.scale_weight` (the older "scaled fp8"
files, which also carry a `scaled_fp8` marker tensor and optional `<layer>.scale_input`) or
`<layer>.weight_scale` (newer files, with a `<layer>.comfy_quant` JSON byte tensor and optional
`<layer>.input_scale`), and the real weight is `weight.float() * scale`. An fp8 weight without a scale
has scale 1. Input scales describe fp8 activations, which this project does not use: they are dropped.
"""
from __future__ import annotations

import json

import torch
from torch import Tensor, nn

from .kernels.masked_lora import fp8_linear

from .checkpoint import CheckpointError, StoredTensor, map_stored

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
QUANTIZE_CHUNK_ELEMENTS = 2**24  # rows are quantized in chunks of about this many elements (64 MB of fp32 temporaries)


# ---------------------------------------------------------------------------------------------------
# The numbers
# ---------------------------------------------------------------------------------------------------

def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(d_out, d_in) float weight -> (float8_e4m3fn (d_out, d_in), fp32 scale (d_out,)), on weight's device.

    Raises ValueError naming the first row with a non-finite value."""
    if weight.ndim != 2:
        raise ValueError(f"quantize_rows expects a (d_out, d_in) weight, got shape {tuple(weight.shape)}")
    out = torch.empty(weight.shape, dtype=FP8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    quantize_rows_into(weight, out, scale)
    return out, scale


def quantize_rows_into(weight: Tensor, out: Tensor, scale: Tensor) -> None:
    """`quantize_rows` writing into existing tensors (rows of a loaded layer), a chunk of rows at a time
    so the fp32 temporaries stay small."""
    step = max(1, QUANTIZE_CHUNK_ELEMENTS // max(1, weight.shape[1]))
    for start in range(0, weight.shape[0], step):
        rows = weight[start:start + step].to(out.device, torch.float32)
        amax = rows.abs().amax(dim=1)  # NaN and inf propagate into amax
        if not torch.isfinite(amax).all():
            bad = start + int((~torch.isfinite(amax)).nonzero()[0])
            raise ValueError(f"row {bad} holds a non-finite value (NaN or inf): cannot quantize")
        s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        out[start:start + step] = (rows / s[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
        scale[start:start + step] = s


def dequantize(weight: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """weight * scale, computed in fp32, returned in `dtype`. scale: a scalar or one per row."""
    scale = scale.to(weight.device, torch.float32)
    if scale.ndim == 1:
        scale = scale.reshape(-1, *([1] * (weight.ndim - 1)))
    return (weight.float() * scale).to(dtype)


class Fp8Linear(nn.Module):
    """A frozen linear holding float8_e4m3fn weights and one fp32 scale per output row."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8, device=device), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float32, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Fp8Linear":
        """Quantize an existing linear's weight (its bias is kept as it is)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    dtype=linear.weight.dtype, device=linear.weight.device)
        q, s = quantize_rows(linear.weight.detach())
        layer.weight.data.copy_(q)
        layer.weight_scale.data.copy_(s)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def forward(self, x: Tensor) -> Tensor:
        # kernels/: Triton on CUDA (fp8 tiles converted in the main loop, the scale on the accumulator);
        # the PyTorch path dequantizes the weight per call
        return fp8_linear(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8"


# ---------------------------------------------------------------------------------------------------
# Which layers
# ---------------------------------------------------------------------------------------------------

def fp8_targets(model: nn.Module, modulation: bool = True) -> list[str]:
    """The transformer's block linears: attention and MLP projections of every double and single block,
    and (default) their adaLN modulation linears, which hold 27 % of FLUX's weights. The embedders and
    the final layer (0.5 %) stay in the model's dtype. (Measured: benchmarks/fp8_precision.py.)"""
    names = []
    for root in ("double_blocks", "single_blocks"):
        for name, module in getattr(model, root).named_modules():
            if isinstance(module, (nn.Linear, Fp8Linear)) and (modulation or not name.endswith(("mod.lin", "modulation.lin"))):
                names.append(f"{root}.{name}")
    return names


def swap_in_fp8(model: nn.Module, names: list[str]) -> None:
    """Replace each named nn.Linear by an (empty) Fp8Linear of the same shape, on the same device
    (usually meta, before streaming) with its bias in the linear's dtype."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        setattr(parent, child, Fp8Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                         dtype=linear.weight.dtype, device=linear.weight.device))


def quantize_model(model: nn.Module, names: list[str] | None = None) -> nn.Module:
    """Quantize the named linears of a loaded model in place (default: `fp8_targets`)."""
    for name in fp8_targets(model) if names is None else names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, Fp8Linear.from_linear(getattr(parent, child)))
    return model


# ---------------------------------------------------------------------------------------------------
# Already-quantized checkpoints, and quantizing while loading
# ---------------------------------------------------------------------------------------------------

_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
_DROPPED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
STORED_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def split_stored_scales(index: dict[str, StoredTensor]) -> tuple[dict[str, StoredTensor], dict[str, Tensor]]:
    """Separate ComfyUI's quantization tensors from the weights: -> (index of the model's own tensors,
    {weight name: its fp32 scale, a scalar or one per row}). Scales are tiny and read here."""
    weights, scales = {}, {}
    for name, stored in index.items():
        if name == "scaled_fp8":  # ComfyUI's marker; its dtype names the fp8 flavour, which the weights hold too
            continue
        if name.endswith(".comfy_quant"):
            config = json.loads(bytes(map_stored(stored).tolist()).decode())
            if config.get("format") != "float8_e4m3fn":
                raise CheckpointError(f"{stored.path}: {name!r} declares quantization format "
                                      f"{config.get('format')!r}; only float8_e4m3fn is supported")
        if name.endswith(_DROPPED_SUFFIXES):
            continue
        if name.endswith(_SCALE_SUFFIXES):
            scale = map_stored(stored).float()
            if not torch.isfinite(scale).all() or (scale <= 0).any():
                raise CheckpointError(f"{stored.path}: scale tensor {name!r} holds a non-positive or non-finite value")
            scales[name.rsplit(".", 1)[0] + ".weight"] = scale.reshape(-1) if scale.numel() > 1 else scale.reshape(())
        else:
            weights[name] = stored
    return weights, scales


def stored_scale_rows(scales: dict[str, Tensor], source: str, rows: tuple[int, int]) -> Tensor | None:
    """The stored scale of rows [start, end) of `source`: None (unscaled), a scalar, or one per row."""
    scale = scales.get(source)
    return scale if scale is None or scale.ndim == 0 else scale[rows[0]:rows[1]]


def stored_values(values: Tensor, scale: Tensor | None) -> Tensor:
    """A stored tensor's real values: fp8 or scaled ones dequantized to fp32, others as they are
    (their consumer, `copy_` or `quantize_rows`, converts them without a temporary)."""
    if scale is None and values.dtype not in STORED_FP8:
        return values
    return dequantize(values, scale if scale is not None else torch.ones(()))


def write_fp8_rows(weight: Tensor, weight_scale: Tensor, at: int, values: Tensor, scale: Tensor | None) -> None:
    """Fill rows [at, at + len(values)) of an Fp8Linear's weight and weight_scale from stored rows:
    float8_e4m3fn rows are kept bit for bit with their stored scale (1 if none); anything else is
    dequantized if need be and quantized per row on the weight's device.
    Raises ValueError for NaN or inf values."""
    rows = slice(at, at + values.shape[0])
    if values.dtype == FP8:
        weight[rows].copy_(values)
        if torch.isnan(weight[rows].float()).any():  # e4m3fn has no inf; its bytes 0x7f and 0xff are NaN
            raise ValueError("holds NaN values")
        weight_scale[rows].copy_(scale if scale is not None else torch.ones(()))
        return
    quantize_rows_into(stored_values(values, scale), weight[rows], weight_scale[rows])
