"""SliderEdit's training objective: self-distillation of "the edit without instruction P_i" into an adapter.

No edited target images are used. For a source latent x (packed, (N, 64)), noise e ~ N(0, I) and a
noise level sigma drawn uniformly from the 1000 training levels {1/1000, ..., 1000/1000}:

    z = (1 - sigma) x + sigma e          the rectified-flow interpolant at time sigma
    input [z ; x]                        noisy tokens (first id 0), then the Kontext context tokens (id 1)
    v_teacher = base(input, reduced prompt)            adapter off, no gradient
    v_student = base+adapter(input, full prompt)       adapter at scale 1
    loss = mean over the N noisy tokens and 64 channels of (v_student - v_teacher)^2, in fp32

The prompts (PPS, partial prompt suppression): a prompt joins instructions P_1 .. P_n with " and ";
k >= 1 of them are suppressed. STLoRA's student sees the full prompt with the adapter on the suppressed
instructions' T5 tokens only; the teacher sees the kept instructions joined (possibly ""). GSTLoRA
suppresses the whole edit: adapter on every token, teacher prompt "keep the image the same".
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..sliders import GSTLORA, set_slider_scale
from ..token_selection import batch_span_scales, subprompt_spans
from ..transformer import Flux

NUM_TRAIN_LEVELS = 1000
JOINER = " and "


# ---------------------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------------------

def draw_sigmas(count: int, generator: torch.Generator) -> Tensor:
    """(count,) fp32 noise levels, uniform over {1/1000, ..., 1000/1000}, on the generator's device."""
    levels = torch.randint(1, NUM_TRAIN_LEVELS + 1, (count,), generator=generator, device=generator.device)
    return levels.float() / NUM_TRAIN_LEVELS


def noisy_latents(x: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """z = (1 - sigma) x + sigma * noise for x, noise (B, N, C) and sigma (B,); computed in fp32 (so bf16
    latents are rounded once, not in each product), returned in x's dtype."""
    s = sigma.float()[:, None, None]
    return ((1 - s) * x.float() + s * noise.float()).to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# Prompts (PPS)
# ---------------------------------------------------------------------------------------------------

def draw_suppressed(n: int, rng: random.Random) -> tuple[int, ...]:
    """k ~ uniform{1..n} of the n instructions to suppress, as sorted positions."""
    return tuple(sorted(rng.sample(range(n), rng.randint(1, n))))


@dataclass(frozen=True)
class DistillationPrompts:
    student: str  # the full prompt
    teacher: str  # the prompt with the suppressed instructions removed
    suppressed: tuple[str, ...]  # STLoRA: the instructions whose tokens the adapter acts on


def distillation_prompts(method: str, instructions: Sequence[str], suppressed: Sequence[int],
                         teacher_prompt: str) -> DistillationPrompts:
    """The student's and the teacher's prompts for one sample. GSTLoRA suppresses everything, so its
    teacher gets the configured neutral prompt and `suppressed` is ignored."""
    student = JOINER.join(instructions)
    if method == GSTLORA:
        return DistillationPrompts(student, teacher_prompt, tuple(instructions))
    if not suppressed or not set(suppressed) <= set(range(len(instructions))):
        raise ValueError(f"suppressed must be a non-empty subset of 0..{len(instructions) - 1}, got {suppressed}")
    kept = [p for i, p in enumerate(instructions) if i not in suppressed]
    return DistillationPrompts(student, JOINER.join(kept), tuple(instructions[i] for i in sorted(suppressed)))


def stlora_token_scales(prompts: Sequence[DistillationPrompts], tokenize: Callable[[str], list[int]],
                        max_length: int) -> Tensor:
    """(b, max_length) fp32: row i is 1 on the T5 tokens of sample i's suppressed instructions in its full
    prompt, 0 elsewhere (the joiners, the kept instructions, EOS and padding are never touched)."""
    spans = [subprompt_spans(p.student, p.suppressed, tokenize, max_length) for p in prompts]
    return batch_span_scales(spans, [[1.0] * len(s) for s in spans], max_length)


def stlora_token_scale(prompts: DistillationPrompts, tokenize: Callable[[str], list[int]], max_length: int) -> Tensor:
    """(max_length,) fp32: one sample's row of stlora_token_scales."""
    return stlora_token_scales([prompts], tokenize, max_length)[0]


# ---------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------

@dataclass
class DistillationBatch:
    """Everything one micro-batch of b samples needs, on the model's device, in its dtype."""
    x: Tensor  # (b, N, 64) packed source latents: the context tokens and the clean target of z
    noise: Tensor  # (b, N, 64)
    sigma: Tensor  # (b,) fp32
    img_ids: Tensor  # (b, 2N, 3): noisy tokens (first id 0), then context tokens (first id 1)
    txt_ids: Tensor  # (b, T, 3) zeros
    guidance: Tensor  # (b,)
    student_txt: Tensor  # (b, T, C) T5 embeddings of the full prompts
    student_vec: Tensor  # (b, D) CLIP pooled
    teacher_txt: Tensor
    teacher_vec: Tensor
    student_scale: float | Tensor  # 1.0 (GSTLoRA) or (b, T) per text token (STLoRA)


def velocity(model: torch.nn.Module, img: Tensor, batch: DistillationBatch, txt: Tensor, vec: Tensor) -> Tensor:
    n = batch.x.shape[1]
    out = model(img=img, img_ids=batch.img_ids, txt=txt, txt_ids=batch.txt_ids,
                timesteps=batch.sigma.to(img.dtype), y=vec, guidance=batch.guidance)
    return out[:, :n]  # the noisy tokens; the context tokens' outputs are not trained


def self_distillation_loss(model: Flux, method: str, batch: DistillationBatch,
                           student: torch.nn.Module | None = None) -> Tensor:
    """MSE (fp32) between the adapted student and the frozen teacher on the noisy tokens.

    `student` is the module the student pass runs through (the DistributedDataParallel wrapper of
    `model`, which reduces the adapter's gradients); the teacher always runs on `model` itself. The
    teacher runs first: with gradient checkpointing the student's blocks are recomputed in the backward
    pass with the slider scales set at that time, so they must not change between the student's
    forward and its backward."""
    img = torch.cat([noisy_latents(batch.x, batch.noise, batch.sigma), batch.x], dim=1)
    set_slider_scale(model, method, None)
    with torch.no_grad():
        target = velocity(model, img, batch, batch.teacher_txt, batch.teacher_vec)
    set_slider_scale(model, method, batch.student_scale)
    prediction = velocity(student or model, img, batch, batch.student_txt, batch.student_vec)
    return F.mse_loss(prediction.float(), target.float())
