"""The shapes, repetitions and time budget of one report, and what a part returns."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bench_lora import SPAN_LEN, SPAN_START

from slideredit.autoencoder import AutoEncoderParams
from slideredit.sliders import GSTLORA, STLORA
from slideredit.transformer import FluxParams

GST_ALPHA, ST_ALPHA = 0.7, 0.8
SLIDER_LABELS = {GSTLORA: "GSTLoRA", STLORA: "STLoRA"}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True)
class Setup:
    """The shapes, repetitions and time budget of one report."""

    name: str
    device: str
    flux: FluxParams
    autoencoder: AutoEncoderParams
    text_tokens: int  # T5 tokens
    edit_px: int  # the edit's side in pixels
    train_px: tuple[int, ...]
    edit_steps: int
    kernel_tokens: tuple[int, ...]  # M of the kernel parts
    ks: tuple[int, ...]
    ranks: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    repeats: int
    rank: int = 16  # of the model-level adapters (edit, forward, training step)
    kernel_layers: tuple[str, ...] | None = None  # the layer shapes of the kernel parts; None: all of them
    compile_backend: str = "inductor"  # the compiled forward's (smoke: aot_eager, the same guards, no C++ build)

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16

    @property
    def fp8_k(self) -> int:
        """K of the fp8 kernel cases: 2, GSTLoRA + STLoRA as the low-memory edit runs them (else the largest K)."""
        return 2 if 2 in self.ks else max(self.ks)

    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        """Every adapted linear of the transformer: name -> (d_in, d_out)."""
        h, m = self.flux.hidden_size, self.flux.mlp_hidden_dim
        shapes = {"attn.qkv": (h, 3 * h), "attn.proj": (h, h), "mlp.0": (h, m), "mlp.2": (m, h),
                  "single linear1": (h, 3 * h + m)}
        return {k: v for k, v in shapes.items() if self.kernel_layers is None or k in self.kernel_layers}

    def live_rows(self, M: int) -> slice:
        """The scaled rows of a kernel case with M tokens: the smallest M is the text stream, with one STLoRA
        span selected; the others are joint tokens, all live."""
        if M != min(self.kernel_tokens):
            return slice(0, M)
        start = min(SPAN_START, M // 4)
        return slice(start, start + min(SPAN_LEN, M // 2))


def real_setup(device: str) -> Setup:
    return Setup("FLUX.1 Kontext [dev] shapes", device, FluxParams.kontext_dev(), AutoEncoderParams.flux(),
                 text_tokens=512, edit_px=1024, train_px=(512, 1024), edit_steps=28, kernel_tokens=(8704, 512),
                 ks=(1, 2, 4), ranks=(16, 32), dtypes=(torch.bfloat16, torch.float16), repeats=3)


def smoke_setup() -> Setup:
    flux = FluxParams(vec_in_dim=32, context_in_dim=32, hidden_size=64, num_heads=2, depth=1, depth_single_blocks=2,
                      axes_dim=(4, 14, 14))  # one double and two single blocks of width 64: every path, tiny
    autoencoder = AutoEncoderParams(ch=32, ch_mult=(1, 1, 1, 1))  # four levels of 32 channels (GroupNorm's 32 groups)
    return Setup("smoke (tiny shapes, CPU; numbers mean nothing)", "cpu", flux, autoencoder,
                 text_tokens=8, edit_px=32, train_px=(32,), edit_steps=2, kernel_tokens=(24, 8), ks=(1, 2),
                 ranks=(4,), dtypes=(torch.bfloat16, torch.float16), repeats=1, rank=4,
                 kernel_layers=("attn.proj",), compile_backend="aot_eager")


@dataclass
class Part:
    """What one part returns: table rows (dicts with the same keys) and notes (skips, errors, labels)."""

    rows: list[dict]
    notes: list[str]


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype))
