"""The masked multi-slider LoRA linear: a frozen linear plus K adapters with per-token scales.

    Y = X W^T + b + sum_k S[:, k] * (X A_k^T) B_k^T

The K adapters are stacked along the rank: A = [A_1; ...; A_K] is (K*r, d_in), B = [B_1 ... B_K] is
(d_out, K*r). S holds one scale per token and adapter; 0 switches the adapter off for that token (a hard
mask: both paths write 0 into H~, not 0 * (X A^T), so inf/NaN from A never reaches such a token; the
Triton path also never reads A or B for row tiles whose scales are all zero, whereas the PyTorch path
multiplies those zero rows of H~ by B). Everything is two primitives on flattened tokens (M, d):

    H~ = scaled_shrink(X, A, S)           fp32 (M, K*r): column group k of X A^T times S[:, k]
    Y  = fused_linear(X, W, b, H~, B, S)  X W^T + b + H~ B^T, in X's dtype

with a Triton implementation (kernels/masked_lora_triton.py: two launches for all K adapters, Y written
once, all-zero row tiles skip the low-rank work) and a PyTorch one (two small GEMMs, one scale, one add
into the base output). The backward reuses them with transposed operands; weight and bias are usually
frozen, and get gradients (plain torch GEMM / sum) only when they require grad:

    G~ = scaled_shrink(dY, B^T, S)        dX = fused_linear(dY, W^T, -, G~, A^T, S)
    dA = G~^T X    dB = dY^T H~    dW = dY^T X    db = sum dY

Dtypes: x, weight and bias share one dtype (fp16, bf16, fp32; the PyTorch path also takes fp64).
Adapters may have any float dtype (typically fp32 beside a bf16 model): they are cast to x's dtype for
the GEMMs, as torch.autocast would; H~ is accumulated and scaled in fp32, and rounded to x's dtype once
for the expand GEMM (the PyTorch path also rounds X A^T to x's dtype once before scaling, as its GEMM
returns x's dtype). Gradients come back in each input's own dtype. token_scale gets no gradient (None):
the Triton path never computes X A^T for masked-off row tiles, so d/dS is not available there.

fp8 weights: weight may be float8_e4m3fn (d_out, d_in) with weight_scale fp32 (d_out,), standing for
W = weight * weight_scale[:, None]. The Triton GEMM converts the fp8 tiles to x's dtype in its main loop
(exact), multiplies the base accumulator by the row scales, then adds the slider term (unscaled, never
quantized) and the bias: Y = (X W8^T) * s + H~ B^T + b. For dX = dY W the scale runs along the
reduction, so each fp8 tile is dequantized to x's dtype as it is loaded. The PyTorch path dequantizes
the whole weight to x's dtype per call. fp8 weights and their scales are frozen (no gradient).
fp8_linear is the same GEMM without adapters, for quantized layers that carry none.
"""
if __package__ != "slideredit.kernels":  # checked first, before torch loads: imported as top-level `kernels`: that name is Hugging Face's package
    raise ImportError(
        f"the SliderEdit kernels import as slideredit.kernels (this file was imported as {__name__!r}): "
        "from slideredit.kernels.masked_lora import masked_lora_linear, fp8_linear"
    )

import importlib.util
import os

import torch
import torch.nn.functional as F

from . import dispatch

MAX_STACKED_RANK = 128  # Triton: K*r, one program keeps the whole stacked rank in registers
FP8 = torch.float8_e4m3fn
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TORCH_DTYPES = _TRITON_DTYPES + (torch.float64,)


def _torch_scaled_shrink(x: torch.Tensor, lora_a: torch.Tensor, scale: torch.Tensor, rank: int) -> torch.Tensor:
    """H~ = S (x) (X A^T): one GEMM, one scale. x (M, D), lora_a (K*r, D), scale (M, K) -> (M, K*r)."""
    M = x.shape[0]
    K = scale.shape[1]
    h = (x @ lora_a.to(x.dtype).t()).to(scale.dtype).view(M, K, rank)
    s = scale[:, :, None]
    return torch.where(s != 0, h * s, 0.0).view(M, K * rank)


def _torch_fused_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    h: torch.Tensor | None, lora_b: torch.Tensor | None, scale: torch.Tensor | None, rank: int,
    weight_scale: torch.Tensor | None = None, weight_scale_dim: int = 0,
) -> torch.Tensor:
    """Y = X W^T + b + H~ B^T: the base GEMM, then one GEMM that adds into its output in place.
    An fp8 weight is dequantized first: weight * weight_scale along weight's dim weight_scale_dim."""
    if weight_scale is not None:
        s = weight_scale[:, None] if weight_scale_dim == 0 else weight_scale[None, :]
        weight = (weight.to(s.dtype) * s).to(x.dtype)
    y = F.linear(x, weight, bias)
    if h is None:
        return y
    return y.addmm_(h.to(x.dtype), lora_b.to(x.dtype).t())  # inside autograd.Function: in place is safe


def _ops(backend: str):
    if backend == "triton":
        from . import masked_lora_triton  # imported on first use: torch-only installs never need triton

        return masked_lora_triton.scaled_shrink, masked_lora_triton.fused_linear
    return _torch_scaled_shrink, _torch_fused_linear


def _forward(backend: str, x, weight, weight_scale, bias, lora_a, lora_b, scale, rank) -> tuple[torch.Tensor, ...]:
    """(H~, Y), or (Y,) without adapters."""
    shrink, fused = _ops(backend)
    if lora_a is None:
        return (fused(x, weight, bias, None, None, None, 0, weight_scale, 0),)
    h = shrink(x, lora_a, scale, rank)  # (M, K*r) fp32: what the backward needs, not Y
    return h, fused(x, weight, bias, h, lora_b, scale, rank, weight_scale, 0)


def _backward(backend: str, dy, weight, weight_scale, lora_a, lora_b, scale, rank, need_x: bool) -> tuple:
    """(G~, dX), (G~,) if x needs no gradient, (dX,) without adapters."""
    shrink, fused = _ops(backend)
    if lora_a is None:
        return (fused(dy, weight.t(), None, None, None, None, 0, weight_scale, 1),)
    g = shrink(dy, lora_b.t(), scale, rank)  # G~ = S (x) (dY B), (M, K*r)
    if not need_x:
        return (g,)
    return g, fused(dy, weight.t(), None, g, lora_a.t(), scale, rank, weight_scale, 1)  # dX = dY W + G~ A


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


class _MaskedLoraLinear(torch.autograd.Function):
    """Autograd on flattened tokens: x (M, d_in), scale (M, K) in the accumulation dtype; lora_a, lora_b
    and scale None for a plain (fp8) linear. backend "auto" asks the dispatcher, separately for the
    forward and the backward."""

    @staticmethod
    def forward(ctx, x, weight, weight_scale, bias, lora_a, lora_b, scale, rank, backend):
        args = (x, weight, weight_scale, bias, lora_a, lora_b, scale, rank)
        if backend == "auto":
            key = _key("forward", x, weight, weight_scale, bias, lora_a)
            out = dispatch.dispatcher().run(key, lambda b: _forward(b, *args), dispatch.TOLERANCE[x.dtype])
        else:
            out = _forward(backend, *args)
        h, y = out if lora_a is not None else (None, out[0])
        ctx.save_for_backward(x, weight, weight_scale, bias, lora_a, lora_b, scale, h)
        ctx.rank, ctx.backend = rank, backend
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, weight_scale, bias, lora_a, lora_b, scale, h = ctx.saved_tensors
        need_x, need_w, _, need_bias, need_a, need_b = ctx.needs_input_grad[:6]
        dy = dy.contiguous()
        dx = dw = dbias = da = db = g = None
        if need_x or need_a:
            args = (dy, weight, weight_scale, lora_a, lora_b, scale, ctx.rank, need_x)
            if ctx.backend == "auto":
                op = "backward_dx" if need_x else "backward_g"
                key = _key(op, dy, weight.t(), weight_scale, None, None if lora_b is None else lora_b.t())
                out = dispatch.dispatcher().run(key, lambda b: _backward(b, *args), dispatch.TOLERANCE[dy.dtype])
            else:
                out = _backward(ctx.backend, *args)
            if lora_a is None:
                dx = out[0]
            else:
                g = out[0]
                dx = out[1] if need_x else None
        if need_a:
            da = (g.t().to(x.dtype) @ x).to(lora_a.dtype)
        if need_b:
            db = (dy.t() @ h.to(dy.dtype)).to(lora_b.dtype)
        if need_w:
            dw = (dy.t() @ x).to(weight.dtype)
        if need_bias:
            dbias = dy.sum(0, dtype=torch.float64 if dy.dtype == torch.float64 else torch.float32).to(bias.dtype)
        return dx, dw, None, dbias, da, db, None, None, None


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
    try:
        broadcast_ok = torch.broadcast_shapes(token_scale.shape, target) == target
    except RuntimeError:
        broadcast_ok = False
    if not broadcast_ok:
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


def _run(x, weight, weight_scale, bias, lora_a, lora_b, token_scale, backend, fn) -> torch.Tensor:
    backend = dispatch.resolve(backend, isinstance(x, torch.Tensor) and x.is_cuda)
    K, rank = _check_inputs(x, weight, weight_scale, bias, lora_a, lora_b, token_scale, backend, fn)
    if backend == "auto" and not _auto_measures(x, weight, lora_a):
        backend = "torch"

    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    scale = None
    if lora_a is not None:
        acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        scale = token_scale.detach().to(acc_dtype).expand(*lead, K).reshape(-1, K)
    if weight_scale is not None:
        weight_scale = weight_scale.detach().contiguous()  # the kernel reads it with unit stride
    y = _MaskedLoraLinear.apply(x2, weight, weight_scale, bias, lora_a, lora_b, scale, rank, backend)
    return y.reshape(*lead, weight.shape[0])


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
) -> torch.Tensor:
    """Y = x W^T + b + sum_k token_scale[..., k] * (x A_k^T) B_k^T for K stacked adapters.

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
    """
    return _run(x, weight, weight_scale, bias, lora_a, lora_b, token_scale, backend, "masked_lora_linear")


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
    return _run(x, weight, weight_scale, bias, None, None, None, backend, "fp8_linear")
