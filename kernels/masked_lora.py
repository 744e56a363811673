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
"""
import importlib.util
import os

import torch
import torch.nn.functional as F

from kernels import dispatch

MAX_STACKED_RANK = 128  # Triton: K*r, one program keeps the whole stacked rank in registers
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
    h: torch.Tensor, lora_b: torch.Tensor, scale: torch.Tensor, rank: int,
) -> torch.Tensor:
    """Y = X W^T + b + H~ B^T: the base GEMM, then one GEMM that adds into its output in place."""
    y = F.linear(x, weight, bias)
    return y.addmm_(h.to(x.dtype), lora_b.to(x.dtype).t())  # inside autograd.Function: in place is safe


def _ops(backend: str):
    if backend == "triton":
        from kernels import masked_lora_triton  # imported on first use: torch-only installs never need triton

        return masked_lora_triton.scaled_shrink, masked_lora_triton.fused_linear
    return _torch_scaled_shrink, _torch_fused_linear


def _forward(backend: str, x, weight, bias, lora_a, lora_b, scale, rank) -> tuple[torch.Tensor, torch.Tensor]:
    shrink, fused = _ops(backend)
    h = shrink(x, lora_a, scale, rank)  # (M, K*r) fp32: what the backward needs, not Y
    return h, fused(x, weight, bias, h, lora_b, scale, rank)


def _backward(backend: str, dy, weight, lora_a, lora_b, scale, rank, need_x: bool) -> tuple[torch.Tensor, ...]:
    shrink, fused = _ops(backend)
    g = shrink(dy, lora_b.t(), scale, rank)  # G~ = S (x) (dY B), (M, K*r)
    if not need_x:
        return (g,)
    return g, fused(dy, weight.t(), None, g, lora_a.t(), scale, rank)  # dX = dY W + G~ A


def _major(t: torch.Tensor) -> str:
    return "row" if t.stride(-1) == 1 else "col"


def _key(op: str, x, weight, bias, lora_a) -> dispatch.Key:
    """The dispatch key of one GEMM pair: x (M, D) against weight (N, D), as the kernels see them."""
    return dispatch.Key(
        device=_device_name(x.device), op=op, x_dtype=str(x.dtype).removeprefix("torch."),
        weight_dtype=str(weight.dtype).removeprefix("torch."), adapter_dtype=str(lora_a.dtype).removeprefix("torch."),
        n=weight.shape[0], d=x.shape[1], stacked_rank=lora_a.shape[0], m_bucket=dispatch.m_bucket(x.shape[0]),
        layout=f"x:{_major(x)} w:{_major(weight)}", extras="bias" if bias is not None else "",
    )


_DEVICE_NAMES: dict[torch.device, str] = {}


def _device_name(device: torch.device) -> str:
    name = _DEVICE_NAMES.get(device)
    if name is None:
        name = _DEVICE_NAMES[device] = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return name


class _MaskedLoraLinear(torch.autograd.Function):
    """Autograd on flattened tokens: x (M, d_in), scale (M, K) in the accumulation dtype.
    backend "auto" asks the dispatcher, separately for the forward and the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, rank, backend):
        args = (x, weight, bias, lora_a, lora_b, scale, rank)
        if backend == "auto":
            key = _key("forward", x, weight, bias, lora_a)
            h, y = dispatch.dispatcher().run(key, lambda b: _forward(b, *args), dispatch.TOLERANCE[x.dtype])
        else:
            h, y = _forward(backend, *args)
        ctx.save_for_backward(x, weight, bias, lora_a, lora_b, scale, h)
        ctx.rank, ctx.backend = rank, backend
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, lora_a, lora_b, scale, h = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        dy = dy.contiguous()
        dx = dw = dbias = da = db = None
        if need_x or need_a:
            args = (dy, weight, lora_a, lora_b, scale, ctx.rank, need_x)
            if ctx.backend == "auto":
                key = _key("backward_dx" if need_x else "backward_g", dy, weight.t(), None, lora_b.t())
                out = dispatch.dispatcher().run(key, lambda b: _backward(b, *args), dispatch.TOLERANCE[dy.dtype])
            else:
                out = _backward(ctx.backend, *args)
            g = out[0]
            if need_x:
                dx = out[1]
        if need_a:
            da = (g.t().to(x.dtype) @ x).to(lora_a.dtype)
        if need_b:
            db = (dy.t() @ h.to(dy.dtype)).to(lora_b.dtype)
        if need_w:
            dw = (dy.t() @ x).to(weight.dtype)
        if need_bias:
            dbias = dy.sum(0, dtype=h.dtype).to(bias.dtype)
        return dx, dw, dbias, da, db, None, None, None


def _auto_measures(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor) -> bool:
    """Whether "auto" should try the Triton path at all (otherwise it takes PyTorch without measuring):
    16-bit x (fp32 has cuBLAS's tensor-core paths; IEEE fp32 Triton tiles are slow), a stack the kernel
    holds, int32 indexing, triton installed, and CUDA tensors (or the interpreter, for tests)."""
    if x.dtype not in (torch.float16, torch.bfloat16) or lora_a.shape[0] > MAX_STACKED_RANK or x.numel() == 0:
        return False
    if max(x.numel(), weight.numel(), (x.numel() // max(x.shape[-1], 1)) * weight.shape[0]) >= 2**31:
        return False
    if importlib.util.find_spec("triton") is None:
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_inputs(x, weight, bias, lora_a, lora_b, token_scale, backend) -> tuple[int, int]:
    """Validate shapes, dtypes and devices; return (K, r)."""
    tensors = {"x": x, "weight": weight, "bias": bias, "lora_a": lora_a, "lora_b": lora_b, "token_scale": token_scale}
    for name, t in tensors.items():
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"masked_lora_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"masked_lora_linear: {name} must be a floating-point tensor, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"masked_lora_linear: {name} is on {t.device} but x is on {x.device}")
    allowed = _TRITON_DTYPES if backend == "triton" else _TORCH_DTYPES
    if x.dtype not in allowed:
        raise TypeError(f"masked_lora_linear: the {backend} backend takes x in {allowed}, got {x.dtype}")
    for name in ("weight", "bias"):
        t = tensors[name]
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"masked_lora_linear: {name} must have x's dtype {x.dtype}, got {t.dtype}")

    if x.dim() < 1:
        raise ValueError("masked_lora_linear: x must have shape (..., d_in), got a 0-d tensor")
    d_in = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != d_in:
        raise ValueError(f"masked_lora_linear: weight must be (d_out, d_in={d_in}), got {tuple(weight.shape)}")
    d_out = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (d_out,):
        raise ValueError(f"masked_lora_linear: bias must be (d_out={d_out},), got {tuple(bias.shape)}")

    if token_scale.dim() < 1 or token_scale.shape[-1] == 0:
        raise ValueError(
            f"masked_lora_linear: token_scale must be (..., K) with K >= 1, got {tuple(token_scale.shape)}"
        )
    K = token_scale.shape[-1]
    target = (*x.shape[:-1], K)
    try:
        broadcast_ok = torch.broadcast_shapes(token_scale.shape, target) == target
    except RuntimeError:
        broadcast_ok = False
    if not broadcast_ok:
        raise ValueError(
            f"masked_lora_linear: token_scale {tuple(token_scale.shape)} does not broadcast to x's tokens {target}"
        )
    if lora_a.dim() != 2 or lora_a.shape[1] != d_in:
        raise ValueError(f"masked_lora_linear: lora_a must be (K*r, d_in={d_in}), got {tuple(lora_a.shape)}")
    stacked_rank = lora_a.shape[0]
    if stacked_rank == 0 or stacked_rank % K != 0:
        raise ValueError(
            f"masked_lora_linear: lora_a has {stacked_rank} rows, not a positive multiple of K={K} "
            f"(token_scale's last dim)"
        )
    if tuple(lora_b.shape) != (d_out, stacked_rank):
        raise ValueError(
            f"masked_lora_linear: lora_b must be (d_out={d_out}, K*r={stacked_rank}), got {tuple(lora_b.shape)}"
        )

    if backend == "triton":
        from kernels.masked_lora_triton import INTERPRET

        if stacked_rank > MAX_STACKED_RANK:
            raise ValueError(
                f"masked_lora_linear: the triton backend takes K*r <= {MAX_STACKED_RANK}, got {stacked_rank}"
            )
        if not x.is_cuda and not INTERPRET:
            raise ValueError(
                "masked_lora_linear: the triton backend needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                "kernels is imported; use backend='torch' on the CPU"
            )
        M = x.numel() // d_in if d_in else 0
        if max(x.numel(), weight.numel(), M * d_out) >= 2**31:
            raise ValueError(
                "masked_lora_linear: the triton backend indexes with int32; a tensor has >= 2**31 elements"
            )
    return K, stacked_rank // K


def masked_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    token_scale: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Y = x W^T + b + sum_k token_scale[..., k] * (x A_k^T) B_k^T for K stacked adapters.

    x: (..., d_in); weight: (d_out, d_in); bias: (d_out,) or None; lora_a: (K*r, d_in);
    lora_b: (d_out, K*r); token_scale: (..., K), broadcastable to x's leading dims ((1, T, K), (K,), ...).
    K is token_scale.shape[-1] and r = lora_a.shape[0] // K. Returns (..., d_out) in x's dtype.
    backend: "triton" (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), "torch",
    "auto" (measure both once per shape on this GPU, keep the faster that agrees: kernels/dispatch.py), or
    None: torch on CPU tensors; on CUDA tensors $SLIDEREDIT_LORA_BACKEND (auto|triton|torch) if set, else
    auto. The argument wins over the variable. Differentiable in x, lora_a, lora_b (and weight, bias
    if they require grad); token_scale gets no gradient.
    """
    backend = dispatch.resolve(backend, isinstance(x, torch.Tensor) and x.is_cuda)
    K, rank = _check_inputs(x, weight, bias, lora_a, lora_b, token_scale, backend)
    if backend == "auto" and not _auto_measures(x, weight, lora_a):
        backend = "torch"

    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    scale = token_scale.detach().to(acc_dtype).expand(*lead, K).reshape(-1, K)
    y = _MaskedLoraLinear.apply(x2, weight, bias, lora_a, lora_b, scale, rank, backend)
    return y.reshape(*lead, weight.shape[0])
