"""The masked multi-slider LoRA linear: a frozen linear plus K adapters with per-token scales.

    Y = X W^T + b + sum_k S[:, k] * (X A_k^T) B_k^T

X: (M, d_in) tokens, W: (d_out, d_in), b: (d_out,). The K adapters are stacked along the rank:
A = [A_1; ...; A_K] is (K*r, d_in), B = [B_1 ... B_K] is (d_out, K*r). S: (M, K) holds one scale per
token and adapter, and 0 is a hard mask: adapter k adds exactly 0 to a token whose S[:, k] is 0, even
where X A_k^T is inf or NaN. `masked_lora_reference`, right below, is this definition in plain PyTorch;
the PyTorch path, the Triton kernels and the tests are checked against it (tests/test_masked_lora.py,
in float64). The rest of the file is engineering: `masked_lora_linear` and `fp8_linear` check their
inputs, flatten the tokens and run one of two paths with one signature, `_torch_masked_lora` below or
the Triton kernels (kernels/masked_lora_triton.py), chosen per shape by kernels/dispatch.py.
"""
if __package__ != "slideredit.kernels":  # checked first, before torch loads: imported as top-level `kernels`: that name is Hugging Face's package
    raise ImportError(
        f"the SliderEdit kernels import as slideredit.kernels (this file was imported as {__name__!r}): "
        "from slideredit.kernels.masked_lora import masked_lora_linear, fp8_linear"
    )

import functools
import importlib.util
import os
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import dispatch

MAX_STACKED_RANK = 128  # Triton: K*r, one program keeps the whole stacked rank in registers
MIN_CAPABILITY = (8, 0)  # Triton: bf16 tensor cores (mma.sync) and asynchronous copies; sm_75 builds neither
FP8 = torch.float8_e4m3fn
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TORCH_DTYPES = _TRITON_DTYPES + (torch.float64,)


def masked_lora_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
    scales: torch.Tensor, rank: int, *, weight_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The definition: x W^T + b + sum_k scales[..., k] (x A_k^T) B_k^T, one adapter at a time, in x's dtype
    (all tensors in one dtype; the tests evaluate it in float64). x: (..., d_in); scales: (..., K),
    broadcasting over x's tokens; A_k, B_k: the k-th block of `rank` rows of lora_a, columns of lora_b.
    An fp8 weight comes with weight_scale (d_out,): it stands for weight * weight_scale[:, None]."""
    if weight_scale is not None:
        weight = weight.to(weight_scale.dtype) * weight_scale[:, None]
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    for k in range(scales.shape[-1]):
        a_k, b_k, s_k = lora_a[k * rank:(k + 1) * rank], lora_b[:, k * rank:(k + 1) * rank], scales[..., k:k + 1]
        y = y + torch.where(s_k != 0, s_k * (x @ a_k.T), 0.0) @ b_k.T  # the hard mask: 0 even if x A_k^T is inf/NaN
    return y


# How it is computed. Both paths implement one function of flattened tokens (M, d):
#
#     H~, Y = path(X, W, b, A, B, S)    H~ = S (x) (X A^T): column group k of X A^T times S[:, k] (hard mask)
#                                       Y  = X W^T + b + H~ B^T
#
# PyTorch (`_torch_masked_lora`): one GEMM for X A^T, one multiply by S, the hard mask, one GEMM added into
# the base output. The hard mask is an op of its own (masked_fill_ where S == 0): no multiply turns an inf
# or NaN of X A^T into 0. A caller that keeps S between calls (SliderLinear) keeps S == 0 with it, or says
# that no scale is 0 and the mask is skipped (masked_lora_linear's zero_scale). Triton
# (kernels/masked_lora_triton.py): two launches for all K adapters, Y written once, and row tiles whose
# scales are all zero never read A or B (the PyTorch path multiplies those zero rows of H~ by B). The
# backward is the same function on transposed operands; weight and bias are usually frozen, and get
# gradients (plain torch GEMM / sum) only when they require grad:
#
#     G~, dX = path(dY, W^T, -, B^T, A^T, S)    G~ = S (x) (dY B),  dX = dY W + G~ A
#     dA = G~^T X    dB = dY^T H~    dW = dY^T X    db = sum dY
#
# Dtypes: x, weight and bias share one dtype (fp16, bf16, fp32; the PyTorch path also takes fp64).
# Adapters may have any float dtype (typically fp32 beside a bf16 model): they are cast to x's dtype for
# the GEMMs, as torch.autocast would. S (x) (X A^T) is scaled in fp32 (fp64 for fp64 x) and rounded to
# x's dtype once for the expand GEMM; the Triton path keeps H~ in fp32 until then and accumulates X A^T in
# fp32, the PyTorch path's GEMM returns X A^T in x's dtype and its H~ is the rounded one. Gradients come
# back in each input's own dtype. token_scale gets no gradient (None): the Triton path never computes
# X A^T for masked-off row tiles, so d/dS is not available there.
#
# fp8 weights: weight may be float8_e4m3fn (d_out, d_in) with weight_scale fp32 (d_out,), standing for
# W = weight * weight_scale[:, None]. The Triton GEMM converts the fp8 tiles to x's dtype in its main loop
# (exact), multiplies the base accumulator by the row scales, then adds the slider term (unscaled, never
# quantized) and the bias: Y = (X W8^T) * s + H~ B^T + b. For dX = dY W the scale runs along the
# reduction, so each fp8 tile is dequantized to x's dtype as it is loaded. The PyTorch path dequantizes
# the whole weight to x's dtype per call. fp8 weights and their scales are frozen (no gradient).
# fp8_linear is the same GEMM without adapters, for quantized layers that carry none.


def _torch_masked_lora(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, scale: torch.Tensor | None, rank: int, *,
    weight_scale: torch.Tensor | None = None, weight_scale_dim: int = 0, need_y: bool = True,
    zero_scale: torch.Tensor | bool | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The PyTorch path: (H~, Y) for x (M, D), weight (N, D), lora_a (K*r, D), lora_b (N, K*r), scale (M, K)
    in the accumulation dtype. H~ is None without adapters (lora_a, lora_b, scale None), Y is None if not
    need_y (a backward that needs G~ only). An fp8 weight is dequantized to x's dtype first: weight times
    weight_scale along weight's dim `weight_scale_dim` (0: one per row; 1: per column, for W^T).
    zero_scale: scale == 0 as an (M, K) bool tensor, False where no scale is 0, None: compared here.
    With adapters in x's dtype (SliderLinear caches them so) the adapters cost, beyond the base linear,
    one GEMM, mul_, masked_fill_ for the hard mask (skipped for zero_scale=False; preceded by eq for
    zero_scale=None) and one GEMM added into Y in place: 3, 4 or 5 ops."""
    h = None
    if lora_a is not None:
        M, K = scale.shape
        h = (x @ lora_a.to(x.dtype).t()).view(M, K, rank)
        h.mul_(scale[:, :, None])  # computed in S's dtype and rounded once to x's dtype, in place
        if zero_scale is None:
            zero_scale = scale == 0
        if zero_scale is not False:
            h.masked_fill_(zero_scale[:, :, None], 0.0)  # the hard mask: 0 * inf and 0 * NaN give 0 here
        h = h.view(M, K * rank)
    if not need_y:
        return h, None
    if weight_scale is not None:
        scales = weight_scale[:, None] if weight_scale_dim == 0 else weight_scale[None, :]
        weight = (weight.to(scales.dtype) * scales).to(x.dtype)
    y = F.linear(x, weight, bias)
    if h is not None:
        y.addmm_(h, lora_b.to(x.dtype).t())  # inside autograd.Function: in place is safe
    return h, y


def _path(backend: str, zero_scale: torch.Tensor | bool | None = None
          ) -> Callable[..., tuple[torch.Tensor | None, torch.Tensor | None]]:
    """`_torch_masked_lora` with the caller's zero_scale, or its Triton twin with the same signature
    (kernels/masked_lora_triton.py), which masks zero scales by itself."""
    if backend == "triton":
        from . import masked_lora_triton  # imported on first use: torch-only installs never need triton

        return masked_lora_triton.masked_lora
    return functools.partial(_torch_masked_lora, zero_scale=zero_scale)


def _major(t: torch.Tensor) -> str:
    return "row" if t.stride(-1) == 1 else "col"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _key(op: str, x, weight, weight_scale, bias, lora_a) -> dispatch.Key:
    """The dispatch key of one GEMM pair: x (M, D) against weight (N, D), as the kernels see them."""
    extras = ",".join(name for name, present in (("bias", bias is not None), ("scale", weight_scale is not None))
                      if present)
    return dispatch.Key(
        device=_device_name(x.device), op=op, x_dtype=_name(x.dtype), weight_dtype=_name(weight.dtype),
        adapter_dtype=_name(lora_a.dtype) if lora_a is not None else "-", n=weight.shape[0], d=x.shape[1],
        stacked_rank=lora_a.shape[0] if lora_a is not None else 0, m_bucket=dispatch.m_bucket(x.shape[0]),
        layout=f"x:{_major(x)} w:{_major(weight)}", extras=extras,
    )


_DEVICE_NAMES: dict[torch.device, str] = {}


def _device_name(device: torch.device) -> str:
    name = _DEVICE_NAMES.get(device)
    if name is None:
        name = _DEVICE_NAMES[device] = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return name


# Cards the Triton kernels cannot serve: below sm_80, or where this Triton failed to build them. "auto"
# takes the PyTorch path there for the rest of the process, after one warning per card; a forced
# "triton" is an error before any launch.
_TRITON_PROBLEMS: dict[torch.device, str | None] = {}
_WARNED_DEVICES: set[torch.device] = set()
_UNBUILDABLE = ("CompilationError", "PTXASError")  # Triton's frontend or ptxas refused the kernels


def triton_problem(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on `device`, naming the card; None where they can (CPU tensors
    are the interpreter's). Checked once per device; a build failure found later is kept here too."""
    if device not in _TRITON_PROBLEMS:
        _TRITON_PROBLEMS[device] = _card_problem(device)
    return _TRITON_PROBLEMS[device]


def _card_problem(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return (f"{_device_name(device)} is sm_{capability[0]}{capability[1]}; the Triton kernels need "
                f"sm_{MIN_CAPABILITY[0]}{MIN_CAPABILITY[1]} or newer (bf16 tensor cores)")
    return None


def _triton_off(device: torch.device) -> bool:
    """For "auto": whether the card rules the Triton path out, warning once per card."""
    problem = triton_problem(device)
    if problem is not None and device not in _WARNED_DEVICES:
        _WARNED_DEVICES.add(device)
        warnings.warn(f"masked_lora_linear: the Triton kernels are off on {device}: {problem}. Every adapted "
                      "and fp8 layer takes the PyTorch path there (fp8 weights are dequantized on every call)",
                      RuntimeWarning, stacklevel=7)  # the caller of masked_lora_linear (forward)
    return problem is not None


def _unbuildable(error: Exception) -> bool:
    """Whether Triton refused to build the kernels at all (its frontend or ptxas): a failure of the card or
    the Triton install, not of one shape (out of shared memory stays the dispatcher's verdict per key).
    Matched by name, as dispatch.is_build_error does, since the classes moved between Triton versions."""
    return any(cls.__module__.startswith("triton.") and cls.__name__ in _UNBUILDABLE for cls in type(error).__mro__)


def _compute(backend: str, op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, scale: torch.Tensor | None, rank: int,
             *, zero_scale: torch.Tensor | bool | None = None,
             **options) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(H~, Y) = path(x, weight, bias, lora_a, lora_b, scale, rank, **options) on `backend`, the PyTorch
    path given zero_scale. In a graph being compiled, Triton and "auto" are one opaque op that runs them
    when the graph runs: the launches and the dispatcher's bookkeeping cannot be traced (each was a graph
    break); that op leaves zero_scale out (its PyTorch path compares S with 0 itself)."""
    if backend == "torch":
        return _torch_masked_lora(x, weight, bias, lora_a, lora_b, scale, rank, zero_scale=zero_scale, **options)
    if torch.compiler.is_compiling():
        outputs = _outside_the_graph(backend, op, x, weight, bias, lora_a, lora_b, scale, rank, **options)
        return _pair(outputs, lora_a)
    return _launch(backend, op, x, weight, bias, lora_a, lora_b, scale, rank, zero_scale=zero_scale, **options)


def _launch(backend: str, op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, scale: torch.Tensor | None, rank: int,
            *, zero_scale: torch.Tensor | bool | None = None,
            **options) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Triton on x's device, or "auto": the dispatcher, keyed by `op` and these operands; the first call
    of a key runs both paths and compares the outputs the call produces (H~ if there are adapters, then Y
    if needed)."""
    if backend == "triton":
        with dispatch.on_device(x.device):  # Triton launches on the current device, whatever x's is
            return _path(backend)(x, weight, bias, lora_a, lora_b, scale, rank, **options)
    if _triton_off(x.device):
        return _torch_masked_lora(x, weight, bias, lora_a, lora_b, scale, rank, zero_scale=zero_scale, **options)

    def produced(name: str) -> tuple[torch.Tensor, ...]:
        try:
            return _tensors(_path(name, zero_scale)(x, weight, bias, lora_a, lora_b, scale, rank, **options))
        except Exception as error:
            if name == "triton" and _unbuildable(error):
                raise dispatch.CardUnsupported(dispatch.describe(error)) from error
            raise

    key = _key(op, x, weight, options.get("weight_scale"), bias, lora_a)
    try:
        outputs = dispatch.dispatcher().run(key, produced, dispatch.TOLERANCE[x.dtype], x.device)
    except dispatch.CardUnsupported as failure:
        import triton

        card = _device_name(x.device)
        _TRITON_PROBLEMS[x.device] = f"triton {triton.__version__} cannot build them for {card}: {failure}"
        _triton_off(x.device)  # the card's one warning
        return _torch_masked_lora(x, weight, bias, lora_a, lora_b, scale, rank, zero_scale=zero_scale, **options)
    return _pair(outputs, lora_a)


def _tensors(outputs: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor, ...]:
    """(H~, Y) without the Nones: H~ if there are adapters, then Y if needed."""
    return tuple(t for t in outputs if t is not None)


def _pair(tensors, lora_a: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """_tensors' inverse: (H~, Y), H~ None without adapters, Y None if not produced."""
    tensors = iter(tensors)
    h = None if lora_a is None else next(tensors)
    return h, next(tensors, None)


@torch.library.custom_op("slideredit::masked_lora", mutates_args=())
def _outside_the_graph(
    backend: str, op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, scale: torch.Tensor | None, rank: int,
    weight_scale: torch.Tensor | None = None, weight_scale_dim: int = 0, need_y: bool = True,
) -> list[torch.Tensor]:
    """_launch as an op a compiled graph calls without tracing it: _tensors of (H~, Y), H~ in x's dtype
    (the Triton path keeps it in fp32; both uses of H~ round it to x's dtype), so that the outputs'
    dtypes do not depend on the backend the dispatcher picks when the graph runs."""
    h, y = _launch(backend, op, x, weight, bias, lora_a, lora_b, scale, rank, weight_scale=weight_scale,
                   weight_scale_dim=weight_scale_dim, need_y=need_y)
    return list(_tensors((None if h is None else h.to(x.dtype), y)))


@_outside_the_graph.register_fake
def _outside_the_graph_shapes(backend, op, x, weight, bias, lora_a, lora_b, scale, rank, weight_scale=None,
                              weight_scale_dim=0, need_y=True):
    """What the op returns, without running it, for tracing: empty (H~, Y) of the right shapes and dtype."""
    h = None if lora_a is None else x.new_empty(x.shape[0], lora_a.shape[0])
    return list(_tensors((h, x.new_empty(x.shape[0], weight.shape[0]) if need_y else None)))


class _MaskedLoraLinear(torch.autograd.Function):
    """Autograd on flattened tokens: x (M, d_in), scale (M, K) in the accumulation dtype, zero_scale (M, K)
    bool, False or None (as `_torch_masked_lora` takes it); lora_a, lora_b and scale None for a plain (fp8)
    linear. backend "auto" asks the dispatcher, separately for the forward and the backward."""

    @staticmethod
    def forward(ctx, x, weight, weight_scale, bias, lora_a, lora_b, scale, zero_scale, rank, backend):
        h, y = _compute(backend, "forward", x, weight, bias, lora_a, lora_b, scale, rank, weight_scale=weight_scale,
                        zero_scale=zero_scale)
        mask = zero_scale if isinstance(zero_scale, torch.Tensor) else None
        ctx.save_for_backward(x, weight, weight_scale, bias, lora_a, lora_b, scale, h, mask)
        ctx.rank, ctx.backend, ctx.no_zero_scale = rank, backend, zero_scale is False
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, weight_scale, bias, lora_a, lora_b, scale, h, zero_scale = ctx.saved_tensors
        zero_scale = False if ctx.no_zero_scale else zero_scale
        need_x, need_w, _, need_bias, need_a, need_b = ctx.needs_input_grad[:6]
        dy = dy.contiguous()
        dx = dw = dbias = da = db = g = None
        if need_x or need_a:  # the forward on transposed operands: G~ = S (x) (dY B), dX = dY W + G~ A
            op = "backward_dx" if need_x else "backward_g"
            lora_bt, lora_at = (None, None) if lora_a is None else (lora_b.t(), lora_a.t())
            g, dx = _compute(ctx.backend, op, dy, weight.t(), None, lora_bt, lora_at, scale, ctx.rank,
                             weight_scale=weight_scale, weight_scale_dim=1, need_y=need_x, zero_scale=zero_scale)
        if need_a:
            da = (g.t().to(x.dtype) @ x).to(lora_a.dtype)
        if need_b:
            db = (dy.t() @ h.to(dy.dtype)).to(lora_b.dtype)
        if need_w:
            dw = (dy.t() @ x).to(weight.dtype)
        if need_bias:
            dbias = dy.sum(0, dtype=torch.float64 if dy.dtype == torch.float64 else torch.float32).to(bias.dtype)
        return dx, dw, None, dbias, da, db, None, None, None, None


def _auto_measures(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor | None) -> bool:
    """Whether "auto" should try the Triton path at all (otherwise it takes PyTorch without measuring):
    16-bit x (fp32 has cuBLAS's tensor-core paths; IEEE fp32 Triton tiles are slow), a stack the kernel
    holds, int32 indexing, triton installed, and CUDA tensors (or the interpreter, for tests)."""
    if x.dtype not in (torch.float16, torch.bfloat16) or x.numel() == 0:
        return False
    if lora_a is not None and lora_a.shape[0] > MAX_STACKED_RANK:
        return False
    if max(x.numel(), weight.numel(), (x.numel() // max(x.shape[-1], 1)) * weight.shape[0]) >= 2**31:
        return False
    if importlib.util.find_spec("triton") is None:
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_inputs(x, weight, weight_scale, bias, lora_a, lora_b, token_scale, backend, fn) -> tuple[int, int]:
    """Validate shapes, dtypes and devices (fn: the public function, for the messages); return (K, r),
    (0, 0) without adapters."""
    tensors = {"x": x, "weight": weight, "weight_scale": weight_scale, "bias": bias, "lora_a": lora_a,
               "lora_b": lora_b, "token_scale": token_scale}
    optional = {"bias", "weight_scale"} | ({"lora_a", "lora_b", "token_scale"} if fn == "fp8_linear" else set())
    for name, t in tensors.items():
        if t is None and name in optional:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but x is on {x.device}")
    allowed = _TRITON_DTYPES if backend == "triton" else _TORCH_DTYPES
    if x.dtype not in allowed:
        raise TypeError(f"{fn}: the {backend} backend takes x in {allowed}, got {x.dtype}")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"{fn}: bias must have x's dtype {x.dtype}, got {bias.dtype}")
    if weight.dtype == FP8:
        if weight_scale is None:
            raise TypeError(f"{fn}: a float8_e4m3fn weight needs weight_scale (fp32, one per output row)")
        if weight.requires_grad:
            raise ValueError(f"{fn}: fp8 weights are frozen; weight must not require grad")
    elif weight_scale is not None:
        raise TypeError(f"{fn}: weight_scale is for float8_e4m3fn weights, but weight is {weight.dtype}")
    elif weight.dtype != x.dtype:
        raise TypeError(f"{fn}: weight must have x's dtype {x.dtype} (or be float8_e4m3fn), got {weight.dtype}")

    if x.dim() < 1:
        raise ValueError(f"{fn}: x must have shape (..., d_in), got a 0-d tensor")
    d_in = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != d_in:
        raise ValueError(f"{fn}: weight must be (d_out, d_in={d_in}), got {tuple(weight.shape)}")
    d_out = weight.shape[0]
    if weight_scale is not None and (tuple(weight_scale.shape) != (d_out,) or weight_scale.dtype != torch.float32):
        raise ValueError(
            f"{fn}: weight_scale must be float32 (d_out={d_out},), got {weight_scale.dtype} {tuple(weight_scale.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (d_out,):
        raise ValueError(f"{fn}: bias must be (d_out={d_out},), got {tuple(bias.shape)}")

    K = rank = 0
    if lora_a is not None:
        K, rank = _check_adapters(x, d_out, lora_a, lora_b, token_scale, fn)
    if backend == "triton":
        from .masked_lora_triton import INTERPRET

        problem = triton_problem(x.device)
        if problem is not None:
            raise ValueError(f"{fn}: the triton backend (backend= or {dispatch.ENV_VAR}) cannot run on "
                             f"{x.device}: {problem}; use 'auto' or 'torch'")
        if K * rank > MAX_STACKED_RANK:
            raise ValueError(f"{fn}: the triton backend takes K*r <= {MAX_STACKED_RANK}, got {K * rank}")
        if not x.is_cuda and not INTERPRET:
            raise ValueError(
                f"{fn}: the triton backend needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                "slideredit.kernels is imported; use backend='torch' on the CPU"
            )
        M = x.numel() // d_in if d_in else 0
        if max(x.numel(), weight.numel(), M * d_out) >= 2**31:
            raise ValueError(f"{fn}: the triton backend indexes with int32; a tensor has >= 2**31 elements")
    return K, rank


def _check_adapters(x, d_out, lora_a, lora_b, token_scale, fn) -> tuple[int, int]:
    d_in = x.shape[-1]
    if token_scale.dim() < 1 or token_scale.shape[-1] == 0:
        raise ValueError(f"{fn}: token_scale must be (..., K) with K >= 1, got {tuple(token_scale.shape)}")
    K = token_scale.shape[-1]
    target = (*x.shape[:-1], K)
    if not _broadcasts(token_scale.shape, target):
        raise ValueError(f"{fn}: token_scale {tuple(token_scale.shape)} does not broadcast to x's tokens {target}")
    if lora_a.dim() != 2 or lora_a.shape[1] != d_in:
        raise ValueError(f"{fn}: lora_a must be (K*r, d_in={d_in}), got {tuple(lora_a.shape)}")
    stacked_rank = lora_a.shape[0]
    if stacked_rank == 0 or stacked_rank % K != 0:
        raise ValueError(
            f"{fn}: lora_a has {stacked_rank} rows, not a positive multiple of K={K} (token_scale's last dim)"
        )
    if tuple(lora_b.shape) != (d_out, stacked_rank):
        raise ValueError(f"{fn}: lora_b must be (d_out={d_out}, K*r={stacked_rank}), got {tuple(lora_b.shape)}")
    return K, stacked_rank // K


def _broadcasts(shape: torch.Size, target: tuple[int, ...]) -> bool:
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def _check_zero_scale(zero_scale, x, target, fn) -> None:
    if zero_scale is None or zero_scale is False:
        return
    if not isinstance(zero_scale, torch.Tensor) or zero_scale.dtype != torch.bool:
        got = zero_scale.dtype if isinstance(zero_scale, torch.Tensor) else repr(zero_scale)
        raise TypeError(f"{fn}: zero_scale must be a bool tensor (token_scale == 0), False (no scale is 0) or "
                        f"None, got {got}")
    if zero_scale.device != x.device:
        raise ValueError(f"{fn}: zero_scale is on {zero_scale.device} but x is on {x.device}")
    if not _broadcasts(zero_scale.shape, target):
        raise ValueError(f"{fn}: zero_scale {tuple(zero_scale.shape)} does not broadcast to x's tokens {target}")


def _prepare(x, weight, weight_scale, bias, lora_a, lora_b, token_scale, backend, fn,
             zero_scale=None) -> tuple[tuple, tuple]:
    """Check the inputs (fn: the public function, for the messages) and pick the backend; -> the arguments
    of _MaskedLoraLinear.apply (tokens flattened, one scale row per token) and the output's shape."""
    backend = dispatch.resolve(backend, isinstance(x, torch.Tensor) and x.is_cuda)
    K, rank = _check_inputs(x, weight, weight_scale, bias, lora_a, lora_b, token_scale, backend, fn)
    if backend == "auto" and not _auto_measures(x, weight, lora_a):
        backend = "torch"

    lead = x.shape[:-1]
    scale = None
    if lora_a is not None:
        _check_zero_scale(zero_scale, x, (*lead, K), fn)
        acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        scale = token_scale.detach().to(acc_dtype).expand(*lead, K).reshape(-1, K)
        if isinstance(zero_scale, torch.Tensor):
            zero_scale = zero_scale.expand(*lead, K).reshape(-1, K)
    if weight_scale is not None:
        weight_scale = weight_scale.detach().contiguous()  # the kernel reads it with unit stride
    args = (x.reshape(-1, x.shape[-1]), weight, weight_scale, bias, lora_a, lora_b, scale, zero_scale, rank, backend)
    return args, (*lead, weight.shape[0])


def masked_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    token_scale: torch.Tensor,
    *,
    backend: str | None = None,
    weight_scale: torch.Tensor | None = None,
    zero_scale: torch.Tensor | bool | None = None,
) -> torch.Tensor:
    """Y = x W^T + b + sum_k token_scale[..., k] * (x A_k^T) B_k^T for K stacked adapters, a zero scale
    adding exactly 0 (the definition: masked_lora_reference).

    x: (..., d_in); weight: (d_out, d_in) in x's dtype, or float8_e4m3fn with weight_scale fp32 (d_out,)
    (W = weight * weight_scale[:, None]; the slider term is added unscaled); bias: (d_out,) or None;
    lora_a: (K*r, d_in); lora_b: (d_out, K*r); token_scale: (..., K), broadcastable to x's leading dims
    ((1, T, K), (K,), ...). K is token_scale.shape[-1] and r = lora_a.shape[0] // K. Returns (..., d_out)
    in x's dtype. Differentiable in x, lora_a, lora_b (and weight, bias if they require grad; never an
    fp8 weight or its scale); token_scale gets no gradient.
    backend: "triton" (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), "torch", "auto" (measure
    both once per shape on this GPU, keep the faster that agrees: kernels/dispatch.py), or None: torch on
    CPU tensors; on CUDA tensors $SLIDEREDIT_LORA_BACKEND (auto|triton|torch) if set, else auto. The
    argument wins over the variable.
    zero_scale: for a caller that keeps token_scale between calls, what the PyTorch path's hard mask needs
    to know, computed once with it: `token_scale == 0` (a bool tensor broadcastable like token_scale), or
    False when no entry of token_scale is 0 (no mask: one op fewer). It must agree with token_scale.
    None (the default): the PyTorch path compares token_scale with 0 on every call. The Triton path masks
    zero scales by itself.
    """
    args, out_shape = _prepare(x, weight, weight_scale, bias, lora_a, lora_b, token_scale, backend,
                               "masked_lora_linear", zero_scale)
    return _MaskedLoraLinear.apply(*args).reshape(out_shape)


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Y = x (weight * weight_scale[:, None])^T + b: a quantized linear without adapters, the same GEMM.

    x: (..., d_in) fp16, bf16 or fp32 (fp64 on the PyTorch path); weight: (d_out, d_in) float8_e4m3fn;
    weight_scale: (d_out,) fp32; bias: (d_out,) in x's dtype or None. Differentiable in x and bias.
    backend: "triton" (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), "torch", "auto" (measure
    both once per shape on this GPU, keep the faster that agrees: kernels/dispatch.py), or None: torch on
    CPU tensors; on CUDA tensors $SLIDEREDIT_LORA_BACKEND (auto|triton|torch) if set, else auto. The
    argument wins over the variable.
    """
    if isinstance(weight, torch.Tensor) and weight.dtype != FP8:
        raise TypeError(f"fp8_linear: weight must be float8_e4m3fn, got {weight.dtype}")
    if weight_scale is None:
        raise TypeError("fp8_linear: weight_scale is required (fp32, one per output row; ones for unscaled)")
    args, out_shape = _prepare(x, weight, weight_scale, bias, lora_a=None, lora_b=None, token_scale=None,
                               backend=backend, fn="fp8_linear")
    return _MaskedLoraLinear.apply(*args).reshape(out_shape)
