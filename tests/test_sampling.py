import numpy as np
import pytest
import torch
from torch import nn

from slideredit.sampling import (
    KontextInputs,
    compute_mu,
    denoise,
    get_schedule,
    initial_noise,
    kontext_velocity,
    latent_ids,
    pack_latents,
    text_ids,
    time_shift,
    unpack_latents,
)
from tiny_kontext import SCHEDULER_CONFIG


def diffusers_scheduler(num_steps: int, image_seq_len: int, config: dict = SCHEDULER_CONFIG):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    # As FluxKontextPipeline.__call__ does.
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    mu = calculate_shift(image_seq_len, config["base_image_seq_len"], config["max_image_seq_len"],
                         config["base_shift"], config["max_shift"])
    scheduler.set_timesteps(sigmas=sigmas, mu=mu)
    return scheduler


@pytest.mark.parametrize("num_steps, image_seq_len", [(1, 256), (4, 1024), (28, 4096), (30, 2294)])
def test_schedule_matches_diffusers(num_steps, image_seq_len):
    schedule = get_schedule(num_steps, image_seq_len)
    sigmas = diffusers_scheduler(num_steps, image_seq_len).sigmas
    assert len(schedule) == num_steps + 1 and schedule[0] == 1.0 and schedule[-1] == 0.0
    assert torch.allclose(torch.tensor(schedule, dtype=torch.float64), sigmas.double(), atol=1e-6, rtol=0)


def test_schedule_by_hand():
    from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift

    assert compute_mu(256) == pytest.approx(0.5) and compute_mu(4096) == pytest.approx(1.15)
    assert compute_mu(1234) == pytest.approx(calculate_shift(1234))
    assert time_shift(1.0, 0.0) == 0.0 and time_shift(1.0, 1.0) == 1.0
    assert time_shift(1.0, 0.5) == pytest.approx(np.e / (np.e + 1))
    schedule = get_schedule(10, 4096)
    assert all(a > b for a, b in zip(schedule, schedule[1:]))
    with pytest.raises(ValueError, match="num_steps"):
        get_schedule(0, 4096)


def test_pack_layout_and_round_trip():
    from diffusers import FluxKontextPipeline

    z = torch.randn(2, 16, 6, 10)
    packed = pack_latents(z)
    assert packed.shape == (2, 15, 64)
    # token (row i, col j), feature c*4 + ph*2 + pw holds z[c, 2i + ph, 2j + pw]
    b, c, i, j, ph, pw = 1, 5, 2, 3, 1, 0
    assert packed[b, i * 5 + j, c * 4 + ph * 2 + pw] == z[b, c, 2 * i + ph, 2 * j + pw]
    assert torch.equal(packed, FluxKontextPipeline._pack_latents(z, 2, 16, 6, 10))
    assert torch.equal(unpack_latents(packed, 48, 80), z)
    assert torch.equal(unpack_latents(packed, 48, 80), FluxKontextPipeline._unpack_latents(packed, 48, 80, 8))
    # Pixel sizes that are not multiples of 16 are floored, as in diffusers.
    assert torch.equal(unpack_latents(packed, 63, 95), FluxKontextPipeline._unpack_latents(packed, 63, 95, 8))
    with pytest.raises(ValueError, match="64x64"):
        unpack_latents(packed, 64, 64)
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.randn(1, 16, 5, 4))


def test_ids_match_diffusers():
    from diffusers import FluxKontextPipeline

    expected = FluxKontextPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
    ids = latent_ids(2, 3, 5)
    assert ids.shape == (2, 15, 3)
    assert torch.equal(ids, expected.expand(2, -1, -1))
    context = latent_ids(2, 3, 5, first_id=1, dtype=torch.bfloat16)
    assert context.dtype == torch.bfloat16
    assert torch.equal(context[..., 0], torch.ones(2, 15, dtype=torch.bfloat16))
    assert torch.equal(context[..., 1:], ids[..., 1:].bfloat16())  # same origin, no offset
    assert torch.equal(text_ids(2, 7), torch.zeros(2, 7, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("height, width", [(64, 96), (1000, 600)])
def test_initial_noise_matches_diffusers(dtype, height, width):
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline(None, None, None, None, None, None, None)  # prepare_latents needs no models
    generator = torch.Generator().manual_seed(123)
    expected, _, expected_ids, _ = pipe.prepare_latents(None, 2, 16, height, width, dtype, "cpu", generator)
    noise = initial_noise(2, height, width, generator=torch.Generator().manual_seed(123), dtype=dtype)
    assert noise.shape == (2, 16, 2 * (height // 16), 2 * (width // 16)) and noise.dtype == dtype
    assert torch.equal(pack_latents(noise), expected)
    assert torch.equal(latent_ids(1, height // 16, width // 16)[0], expected_ids)
    with pytest.raises(ValueError, match="16x16"):
        initial_noise(1, 8, 64)


class ToyFlow(nn.Module):
    """A linear stand-in for Flux.forward that depends on every input, recording what it was given."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(0.1 * torch.randn(64, 64, generator=g, dtype=dtype))
        self.mix = nn.Parameter(0.1 * torch.randn(64, 64, generator=g, dtype=dtype))
        self.t_dir, self.g_dir, self.id_dir = (torch.randn(64, generator=g, dtype=dtype) for _ in range(3))
        self.txt_proj = nn.Parameter(0.1 * torch.randn(8, 64, generator=g, dtype=dtype))
        self.y_proj = nn.Parameter(0.1 * torch.randn(4, 64, generator=g, dtype=dtype))
        self.calls = []

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance):
        self.calls.append((img.shape[1], timesteps.clone(), guidance.clone()))
        d = img.dtype
        return (
            img @ self.w.to(d)
            + img.mean(dim=1, keepdim=True) @ self.mix.to(d)  # every token sees the context tokens
            + timesteps[:, None, None] * self.t_dir.to(d)
            + guidance[:, None, None] * self.g_dir.to(d)
            + (img_ids[..., :1] + img_ids[..., 1:2] - img_ids[..., 2:]) * 0.01 * self.id_dir.to(d)
            + (txt.mean(dim=1) @ self.txt_proj.to(d) + txt_ids.sum() + y @ self.y_proj.to(d))[:, None, :]
        )


def toy_inputs(dtype):
    """KontextInputs' fields: two images of 6 noisy and 4 context tokens, a 5-token prompt."""
    g = torch.Generator().manual_seed(1)
    img, cond = torch.randn(2, 6, 64, generator=g), torch.randn(2, 4, 64, generator=g)
    txt, vec = torch.randn(2, 5, 8, generator=g), torch.randn(2, 4, generator=g)
    tensors = dict(img=img, txt=txt, vec=vec, cond=cond)
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    ids = dict(img_ids=latent_ids(2, 2, 3), cond_ids=latent_ids(2, 2, 2, first_id=1), txt_ids=text_ids(2, 5))
    return {**tensors, **ids}


def kontext_denoise(model, inputs: dict, timesteps, guidance, progress=False):
    """Euler steps of `model` on the Kontext inputs (the pipeline's loop without sliders or CFG)."""
    inputs = KontextInputs(**inputs)
    return denoise(kontext_velocity(model, inputs, guidance), inputs.img, timesteps, progress=progress)


def test_denoise_equals_hand_euler_in_float64():
    inputs = toy_inputs(torch.float64)
    model, schedule = ToyFlow(), get_schedule(5, 6)
    out = kontext_denoise(model, inputs, timesteps=schedule, guidance=2.5)

    x = inputs["img"].clone()
    ids = torch.cat([inputs["img_ids"], inputs["cond_ids"]], dim=1)
    for i in range(5):
        t, t_next = schedule[i], schedule[i + 1]
        v = ToyFlow()(
            torch.cat([x, inputs["cond"]], dim=1), ids, inputs["txt"], inputs["txt_ids"],
            torch.full((2,), t, dtype=torch.float64), inputs["vec"], torch.full((2,), 2.5, dtype=torch.float64),
        )[:, :6]
        x = x + (t_next - t) * v
    assert out.dtype == torch.float64
    assert torch.allclose(out, x, atol=1e-12, rtol=0)
    assert [n for n, _, _ in model.calls] == [10] * 5  # noisy + context tokens every step
    assert [c[1][0].item() for c in model.calls] == schedule[:-1]


def test_denoise_matches_diffusers_scheduler_in_float32():
    inputs = toy_inputs(torch.float32)
    out = kontext_denoise(ToyFlow(torch.float32), inputs, timesteps=get_schedule(4, 6), guidance=3.5)

    model, scheduler = ToyFlow(torch.float32), diffusers_scheduler(4, 6)
    x = inputs["img"]
    ids = torch.cat([inputs["img_ids"], inputs["cond_ids"]], dim=1)
    for t in scheduler.timesteps:
        v = model(
            torch.cat([x, inputs["cond"]], dim=1), ids, inputs["txt"], inputs["txt_ids"],
            (t / 1000).expand(2), inputs["vec"], torch.full((2,), 3.5),
        )[:, :6]
        x = scheduler.step(v, t, x, return_dict=False)[0]
    assert torch.allclose(out, x, atol=1e-5, rtol=1e-5)


def test_denoise_bf16_builds_vectors_in_latent_dtype_and_tracks_fp32():
    inputs = toy_inputs(torch.bfloat16)
    model = ToyFlow(torch.float32)
    out = kontext_denoise(model, inputs, timesteps=get_schedule(3, 6), guidance=2.5)
    assert out.dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 and g.dtype == torch.bfloat16 for _, t, g in model.calls)
    upcast = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in inputs.items()}
    reference = kontext_denoise(ToyFlow(torch.float32), upcast, timesteps=get_schedule(3, 6), guidance=2.5)
    # The toy model itself runs in bf16: a few bf16 ulps of values up to ~10.
    assert torch.allclose(out.float(), reference, atol=0.1, rtol=0)


def test_bf16_step_is_rounded_once():
    """x + dt * v is formed in fp32 and rounded to bf16 once (BFL rounds the product and the sum)."""
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(1, 4096, 64, generator=g).bfloat16(), torch.randn(1, 4096, 64, generator=g).bfloat16()
    out = denoise(lambda x, t, i: v, x, timesteps=[1.0, 0.625], progress=False)
    exact = x.double() - 0.375 * v.double()  # dt = -3/8: the fp32 product is exact
    assert torch.equal(out, exact.bfloat16())
    assert not torch.equal(out, x - 0.375 * v)  # the all-bf16 update differs somewhere


def test_denoise_without_context_and_progress_bar(capsys):
    inputs = toy_inputs(torch.float64)
    del inputs["cond"], inputs["cond_ids"]
    model = ToyFlow()
    kontext_denoise(model, inputs, timesteps=[1.0, 0.5, 0.0], guidance=1.0, progress=True)
    assert [n for n, _, _ in model.calls] == [6, 6]
    assert "2/2" in capsys.readouterr().err
    kontext_denoise(model, inputs, timesteps=[1.0, 0.0], guidance=1.0, progress=False)
    assert capsys.readouterr().err == ""


def test_denoise_rejects_bad_arguments():
    inputs = toy_inputs(torch.float64)
    with pytest.raises(ValueError, match="cond_ids"):
        kontext_denoise(ToyFlow(), {**inputs, "cond_ids": None}, timesteps=[1.0, 0.0], guidance=1.0)
    with pytest.raises(ValueError, match="two timesteps"):
        kontext_denoise(ToyFlow(), inputs, timesteps=[1.0], guidance=1.0)


def test_velocity_sees_each_step_and_step_end_latents_carry_on_in_float64():
    """velocity(x, t, i) gets the current latents, the step's time and its index; the latents on_step_end
    returns are where the next step starts (as a callback replacing the latents)."""
    inputs = toy_inputs(torch.float64)
    schedule = get_schedule(3, 6)
    model_velocity = kontext_velocity(ToyFlow(), KontextInputs(**inputs), 2.5)
    seen, ends = [], []

    def velocity(x, t, i):
        seen.append((x, t, i))
        return model_velocity(x, t, i)

    def on_step_end(i, t, x):
        ends.append((i, t))
        return x * 0.5 if i == 0 else x

    out = denoise(velocity, inputs["img"], schedule, progress=False, on_step_end=on_step_end)

    x = inputs["img"]
    for i in range(3):
        t, t_next = schedule[i], schedule[i + 1]
        assert torch.allclose(seen[i][0], x, atol=1e-12, rtol=0) and seen[i][1:] == (t, i)
        x = x + (t_next - t) * model_velocity(x, t, i)
        x = x * 0.5 if i == 0 else x
    assert torch.allclose(out, x, atol=1e-12, rtol=0)
    assert ends == [(i, schedule[i]) for i in range(3)]
