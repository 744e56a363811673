"""Rectified-flow sampling for FLUX.1 Kontext: schedule, latent packing, position ids, noise, the model's
velocity on the Kontext inputs, Euler loop.

x_t = (1 - t) x0 + t * noise; the model predicts v ~ noise - x0; Euler steps go from t = 1 to t = 0.
"""
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm


def time_shift(mu: float, t: float) -> float:
    """Shift t towards 1 by e^mu: t' = e^mu / (e^mu + (1/t - 1)); t = 0 stays 0."""
    if t <= 0:
        return 0.0
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def compute_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """The shift grows linearly with the number of noisy image tokens (more tokens -> more shift)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def get_schedule(
    num_steps: int,
    image_seq_len: int,
    *,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> list[float]:
    """num_steps + 1 times from 1 down to 0. image_seq_len counts the NOISY tokens only (no context)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    mu = compute_mu(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)
    return [time_shift(mu, 1 - i / num_steps) for i in range(num_steps + 1)]


def pack_latents(z: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C*4): 2x2 patches, feature index c*4 + ph*2 + pw."""
    b, c, h, w = z.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even to pack 2x2 patches, got {h}x{w}")
    z = z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: Tensor, height: int, width: int) -> Tensor:
    """(B, L, C*4) -> (B, C, 2*(height//16), 2*(width//16)); height and width are PIXEL sizes."""
    b, seq_len, features = x.shape
    h, w = height // 16, width // 16  # token grid; each token is a 2x2 latent patch = 16x16 pixels
    if seq_len != h * w or features % 4:
        raise ValueError(
            f"cannot unpack {tuple(x.shape)} into a {height}x{width} image: expected {h * w} tokens "
            f"of a multiple of 4 features"
        )
    x = x.reshape(b, h, w, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, features // 4, h * 2, w * 2)


def latent_ids(
    batch: int,
    h_tokens: int,
    w_tokens: int,
    first_id: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """(B, h*w, 3) position ids (first_id, row, col): 0 for noisy tokens, 1 for context tokens."""
    ids = torch.zeros(h_tokens, w_tokens, 3, device=device, dtype=dtype)
    ids[..., 0] = first_id
    ids[..., 1] = torch.arange(h_tokens, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w_tokens, device=device, dtype=dtype)[None, :]
    return ids.reshape(1, h_tokens * w_tokens, 3).repeat(batch, 1, 1)


def text_ids(
    batch: int, seq_len: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """(B, T, 3) zeros: text tokens are not rotated by RoPE."""
    return torch.zeros(batch, seq_len, 3, device=device, dtype=dtype)


def initial_noise(
    batch: int,
    height: int,
    width: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """(B, 16, 2*(height//16), 2*(width//16)) standard normal noise, unpacked.

    Drawn with one torch.randn call on the generator's device and then moved, as diffusers'
    randn_tensor does, so a seeded generator gives the same noise as FluxKontextPipeline.
    """
    if height < 16 or width < 16:
        raise ValueError(f"output must be at least 16x16 pixels, got {width}x{height}")
    shape = (batch, 16, 2 * (height // 16), 2 * (width // 16))
    draw_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)


Velocity = Callable[[Tensor, float, int], Tensor]  # velocity(x, t, i): noisy latents, time (sigma), step index
StepEnd = Callable[[int, float, Tensor], Tensor]  # on_step_end(i, t, x) -> the latents to continue from


@dataclass
class KontextInputs:
    """What the transformer sees for one edit (Black Forest Labs' prepare_kontext): the noisy target
    tokens, then the context image's tokens (position ids with first id 1), and the prompt."""
    img: Tensor  # (B, N, 64) packed noise: the flow starts here
    img_ids: Tensor  # (B, N, 3) position ids of the noisy tokens, first id 0
    txt: Tensor  # (B, T, d) T5 embeddings
    txt_ids: Tensor  # (B, T, 3) zeros
    vec: Tensor  # (B, d) CLIP pooled
    cond: Tensor | None = None  # (B, M, 64) packed context latents, appended after the noisy tokens
    cond_ids: Tensor | None = None  # (B, M, 3), first id 1

    def __post_init__(self) -> None:
        if (self.cond is None) != (self.cond_ids is None):
            raise ValueError("give both cond and cond_ids, or neither")


def kontext_velocity(model: Callable[..., Tensor], inputs: KontextInputs, guidance: float) -> Velocity:
    """velocity(x, t, i) of a Kontext transformer: x (B, N, 64), then the context tokens, in; the first N
    predicted tokens out. The prompt is read from `inputs` at each call (a step-end callback may replace it)."""
    ids = inputs.img_ids if inputs.cond is None else torch.cat([inputs.img_ids, inputs.cond_ids], dim=1)
    img = inputs.img  # BFL builds the timestep and guidance vectors in the latent dtype
    guidance_vec = torch.full((img.shape[0],), guidance, dtype=img.dtype, device=img.device)

    def velocity(x: Tensor, t: float, i: int) -> Tensor:
        t_vec = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
        tokens = x if inputs.cond is None else torch.cat([x, inputs.cond], dim=1)
        out = model(img=tokens, img_ids=ids, txt=inputs.txt, txt_ids=inputs.txt_ids, timesteps=t_vec, y=inputs.vec,
                    guidance=guidance_vec)
        return out[:, :x.shape[1]]

    return velocity


@torch.no_grad()
def denoise(velocity: Velocity, x: Tensor, timesteps: list[float], *, progress: bool = True,
            on_step_end: StepEnd | None = None) -> Tensor:
    """Euler integration of dx/dt = velocity(x, t, i) from timesteps[0] (noise) to timesteps[-1] (image).

    on_step_end(i, t, x), when given, runs after each step and returns the latents to continue from."""
    if len(timesteps) < 2:
        raise ValueError(f"need at least two timesteps (start and end), got {len(timesteps)}")
    steps = list(zip(timesteps[:-1], timesteps[1:]))
    for i, (t_curr, t_prev) in enumerate(tqdm(steps, disable=not progress, desc="denoising")):
        v = velocity(x, t_curr, i)
        x = _euler_step(x, v, t_prev - t_curr)
        if on_step_end is not None:
            x = on_step_end(i, t_curr, x)
    return x


def _euler_step(x: Tensor, v: Tensor, dt: float) -> Tensor:
    # Like diffusers' scheduler, add in (at least) fp32 and cast back: bf16 latents then lose
    # precision once per step rather than in the product and the sum.
    dtype = torch.promote_types(x.dtype, torch.float32)
    return (x.to(dtype) + dt * v.to(dtype)).to(x.dtype)
