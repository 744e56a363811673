"""One GSTLoRA and one STLoRA training step (self-distillation loss, AdamW) at 512^2 and 1024^2, gradient
checkpointing on and off."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from gpu_report_parts.measure import fmt_gib, free_memory, out_of_time, peak_gib, spread_ms, time_calls
from gpu_report_parts.random_models import random_adapter, text_span_scale, transformer_inputs
from gpu_report_parts.setups import Part, Setup
from slideredit.sliders import GSTLORA, STLORA, remove_adapters
from slideredit.transformer import Flux

if TYPE_CHECKING:
    from slideredit.training.losses import DistillationBatch


def distillation_batch(setup: Setup, method: str, px: int) -> DistillationBatch:
    """One random px x px sample for self_distillation_loss (batch 1): target, noise, ids, student and
    teacher conditioning; STLoRA's student scale selects one text span."""
    # imported here, so that an import failure fails the part using it only (guarded), not the whole report
    from slideredit.training.losses import DistillationBatch

    dev, dt = setup.device, setup.dtype
    inputs = transformer_inputs(setup, px, seed=5)
    n = inputs["img"].shape[1] // 2
    g = torch.Generator(dev).manual_seed(6)
    rand = lambda *shape: torch.randn(*shape, generator=g, device=dev).to(dt)
    return DistillationBatch(
        x=inputs["img"][:, n:], noise=rand(1, n, setup.flux.in_channels), sigma=torch.full((1,), 0.6, device=dev),
        img_ids=inputs["img_ids"], txt_ids=inputs["txt_ids"], guidance=torch.full((1,), 3.5, device=dev, dtype=dt),
        student_txt=inputs["txt"], student_vec=inputs["y"], teacher_txt=rand(*inputs["txt"].shape),
        teacher_vec=rand(*inputs["y"].shape),
        student_scale=1.0 if method == GSTLORA else (text_span_scale(setup, 1.0) > 0).float())


def measure(setup: Setup, model: Flux, deadline: float) -> Part:
    # imported here, so that an import failure fails this part only (guarded), not the whole report
    from slideredit.training.losses import self_distillation_loss

    dev, rows, notes = setup.device, [], []
    cases = [(method, px, ckpt) for px in setup.train_px for method in (GSTLORA, STLORA) for ckpt in (True, False)]
    for method, px, ckpt in cases:
        label = {"method": method, "resolution": f"{px}^2", "gradient checkpointing": "on" if ckpt else "off"}
        if out_of_time(deadline):
            rows.append({**label, "step ms (min / median / max)": "skipped: time budget"})
            continue
        random_adapter(model, method, setup.rank, dev, trainable=True)
        model.gradient_checkpointing = ckpt
        optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
        batch = distillation_batch(setup, method, px)

        def step():
            optimizer.zero_grad(set_to_none=True)
            self_distillation_loss(model, method, batch).backward()
            optimizer.step()

        try:
            seconds, peak = time_calls(step, dev, max(1, setup.repeats - 1))
            rows.append({**label, "step ms (min / median / max)": spread_ms(seconds), "peak GiB": fmt_gib(peak)})
        except torch.OutOfMemoryError:
            rows.append({**label, "step ms (min / median / max)": "out of memory", "peak GiB": fmt_gib(peak_gib(dev))})
        finally:
            optimizer = batch = None
            model.gradient_checkpointing = False
            remove_adapters(model)
            model.requires_grad_(False)
            free_memory(dev)
    notes.append(f"batch 1; one step = teacher forward (no grad) + student forward + backward + AdamW on the "
                 f"adapter (rank {setup.rank}, fp32); one warm-up step, then the timed ones; peak over the timed steps")
    return Part(rows, notes)
