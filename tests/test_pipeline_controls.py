"""Slider control beyond the release's calls: batched alphas, step windows and callables, step-end
callbacks, true CFG. References: cell-by-cell calls, a hand-written Euler loop that sets the slider
scales itself, and diffusers' FluxKontextPipeline (true CFG without sliders)."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from slideredit.pipelines import CALLBACK_TENSOR_INPUTS, SliderEditFluxKontextPipeline
from slideredit.sampling import get_schedule, latent_ids, text_ids, unpack_latents
from slideredit.sliders import GSTLORA, STLORA, set_slider_scale
from slideredit.token_selection import subprompt_token_scales
from test_pipeline_sliders import gst_folder, st_file  # noqa: F401 (fixtures)

PROMPT = "make the hair red and add a hat"
SUBS = ["make the hair red", "add a hat"]
STEPS = 3
HEIGHT, WIDTH = 32, 48
N_TOKENS = (HEIGHT // 16) * (WIDTH // 16)
EPS = torch.finfo(torch.float32).eps


def close(got, expected, ulps=64):
    """Equal up to `ulps` float32 ULPs of the output's scale: batched GEMMs round differently than
    batch-1 ones (measured here: 12 ULPs for a batch of 3)."""
    return bool((got - expected).abs().max() <= ulps * EPS * expected.abs().max())


@pytest.fixture(scope="module")
def pipe(tiny_kontext_dir, gst_folder, st_file):  # noqa: F811
    pipe = SliderEditFluxKontextPipeline.from_pretrained(tiny_kontext_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_gstlora(gst_folder)
    pipe.load_stlora(st_file)
    return pipe


def image():
    return Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8))


def noise(seed=2, batch=1):
    return torch.randn(batch, N_TOKENS, 64, generator=torch.Generator().manual_seed(seed))


def edit(pipe, **kwargs):
    kwargs = {"prompt": PROMPT, "num_inference_steps": STEPS, **kwargs}
    if "generator" not in kwargs and "latents" not in kwargs:
        kwargs["latents"] = noise()
    return pipe(image=image(), guidance_scale=2.5, height=HEIGHT, width=WIDTH, output_type="pt", auto_resize=False,
                **kwargs).images


def token_scales(pipe, subprompts, alphas):
    if not subprompts:
        return None
    return subprompt_token_scales(PROMPT, subprompts, alphas, pipe.text_encoders.t5_token_ids, 512)[None]


def hand_loop(pipe, scales_at, negative_prompt=None, true_cfg_scale=1.0, after_step_0=None):
    """The edit with its own Euler loop: scales_at(step, negative_branch) -> {adapter: scale}, each set
    with set_slider_scale before its model call; true CFG combined here as v_neg + s (v - v_neg).
    after_step_0: {diffusers' name (CALLBACK_TENSOR_INPUTS): embeddings} used instead from step 1 on."""
    txt, vec = pipe.encode_prompt(PROMPT)
    cond, context_w, context_h = pipe.encode_image(image(), 1, auto_resize=False)
    ids = torch.cat([latent_ids(1, HEIGHT // 16, WIDTH // 16, 0), latent_ids(1, context_h // 16, context_w // 16, 1)], 1)
    timesteps = get_schedule(STEPS, N_TOKENS)
    x = noise()
    with torch.no_grad():
        for i in range(STEPS):
            t, t_next = timesteps[i], timesteps[i + 1]

            def velocity(prompt_txt, prompt_vec, negative_branch):
                for name, scale in scales_at(i, negative_branch).items():
                    set_slider_scale(pipe.transformer, name, scale)
                out = pipe.transformer(img=torch.cat([x, cond], 1), img_ids=ids, txt=prompt_txt,
                                       txt_ids=text_ids(1, prompt_txt.shape[1]), timesteps=torch.full((1,), t),
                                       y=prompt_vec, guidance=torch.full((1,), 2.5))
                return out[:, :N_TOKENS]

            now = (after_step_0 or {}) if i > 0 else {}
            v = velocity(now.get("prompt_embeds", txt), now.get("pooled_prompt_embeds", vec), False)
            if negative_prompt is not None:
                neg_txt, neg_vec = pipe.encode_prompt(negative_prompt)
                v_neg = velocity(now.get("negative_prompt_embeds", neg_txt),
                                 now.get("negative_pooled_prompt_embeds", neg_vec), True)
                v = v_neg + true_cfg_scale * (v - v_neg)
            x = x + (t_next - t) * v
        pixels = pipe.autoencoder.decode(unpack_latents(x, HEIGHT, WIDTH))
    return (pixels.float() / 2 + 0.5).clamp(0, 1)


def assert_separated(cells):
    """Every pair of cells differs clearly, far beyond any rounding bound."""
    for i in range(len(cells)):
        for j in range(i + 1, len(cells)):
            assert (cells[i] - cells[j]).abs().max() > 1e-3


# --- batched alphas -------------------------------------------------------------------------------

def test_batched_gstlora_equals_cell_by_cell(pipe):
    alphas = [-1.0, 0.5, 1.0]
    seeded = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    batched = edit(pipe, slider_alpha=alphas, generator=seeded())
    cells = [edit(pipe, slider_alpha=a, generator=seeded()) for a in alphas]
    assert batched.shape == (3, 3, HEIGHT, WIDTH)
    assert_separated(cells)  # so the next line proves each alpha reached its own image
    for i, cell in enumerate(cells):
        assert close(batched[i:i + 1], cell), i


def test_batched_stlora_and_gstlora_together(pipe):
    """An entry of slider_alpha_list that is a list sweeps that slider; a number holds it."""
    batched = edit(pipe, slider_alpha=[0.0, 1.0], subprompts_list=SUBS, slider_alpha_list=[[1.0, -1.0], 0.5])
    cells = [edit(pipe, slider_alpha=0.0, subprompts_list=SUBS, slider_alpha_list=[1.0, 0.5]),
             edit(pipe, slider_alpha=1.0, subprompts_list=SUBS, slider_alpha_list=[-1.0, 0.5])]
    assert_separated(cells)
    assert close(batched[:1], cells[0]) and close(batched[1:], cells[1])


def test_a_list_of_one_prompt_is_repeated_over_the_alpha_batch(pipe):
    """prompt=[p] with per-image alphas is prompt=p: the one prompt, its sub-prompt spans included, serves
    every image of the batch."""
    kwargs = dict(subprompts_list=SUBS, slider_alpha_list=[[1.0, -1.0], 0.5])
    assert torch.equal(edit(pipe, prompt=[PROMPT], **kwargs), edit(pipe, **kwargs))


def test_one_generator_per_image_gives_each_its_own_noise(pipe):
    batched = edit(pipe, slider_alpha=[0.5, 0.5], generator=[torch.Generator().manual_seed(s) for s in (3, 4)])
    cells = [edit(pipe, slider_alpha=0.5, generator=torch.Generator().manual_seed(s)) for s in (3, 4)]
    assert_separated(cells)
    assert close(batched[:1], cells[0]) and close(batched[1:], cells[1])


def test_batch_rules(pipe):
    with pytest.raises(ValueError, match="2 prompts and per-image alpha lists of length 3"):
        edit(pipe, prompt=[PROMPT, PROMPT], slider_alpha=[0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="different lengths \\[2, 3\\]"):
        edit(pipe, slider_alpha=[0.0, 1.0], subprompts_list=SUBS, slider_alpha_list=[[0.0, 0.5, 1.0], 0.0])
    with pytest.raises(ValueError, match="2 generators for a batch of 3 images"):
        edit(pipe, slider_alpha=[0.0, 0.5, 1.0], generator=[torch.Generator(), torch.Generator()])
    with pytest.raises(ValueError, match=r"slider_alpha\[1\] must be a finite number"):
        edit(pipe, slider_alpha=[0.0, math.nan])


# --- schedules ------------------------------------------------------------------------------------

def test_slider_steps_equal_a_loop_that_switches_at_that_step(pipe):
    got = edit(pipe, slider_alpha=1.0, slider_steps=(0.5, 1))
    # same kernels on the same shapes on both sides: exact
    expected = hand_loop(pipe, lambda i, neg: {GSTLORA: None if i < 2 else 1.0, STLORA: None})
    assert torch.equal(got, expected)
    assert torch.equal(edit(pipe, slider_alpha=1.0, slider_steps=(0.4, 1)), got)  # step i acts when i / 3 >= 0.4
    assert (edit(pipe, slider_alpha=1.0) - got).abs().max() > 1e-3  # the first two steps mattered


def test_one_window_per_stlora_subprompt(pipe):
    got = edit(pipe, subprompts_list=SUBS, slider_alpha_list=[1.0, -1.0], slider_steps=[(0, 1), (0.5, 1)])
    first, both = token_scales(pipe, SUBS[:1], [1.0]), token_scales(pipe, SUBS, [1.0, -1.0])
    expected = hand_loop(pipe, lambda i, neg: {GSTLORA: None, STLORA: first if i < 2 else both})
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="2 \\(start, end\\) pairs for 1 sub-prompts"):
        edit(pipe, subprompts_list=SUBS[:1], slider_alpha_list=[1.0], slider_steps=[(0, 1), (0.5, 1)])
    with pytest.raises(ValueError, match="need 0 <= start < end <= 1"):
        edit(pipe, slider_alpha=1.0, slider_steps=(0.5, 0.2))


def test_callable_alpha_is_asked_at_every_step(pipe):
    calls = []
    values = [0.0, 0.5, -1.0]
    alpha = lambda i, sigma: calls.append((i, sigma)) or values[i]  # noqa: E731
    got = edit(pipe, slider_alpha=alpha)
    assert calls == list(zip(range(STEPS), get_schedule(STEPS, N_TOKENS)[:-1]))
    assert torch.equal(got, hand_loop(pipe, lambda i, neg: {GSTLORA: values[i], STLORA: None}))


# --- step-end callbacks ----------------------------------------------------------------------------

def test_callback_sees_each_step_and_can_move_the_sliders(pipe):
    seen = []

    def callback(p, step, timestep, kwargs):
        seen.append((p, step, float(timestep), sorted(kwargs)))
        return {"slider_alpha": 1.0} if step == 1 else {}

    got = edit(pipe, slider_alpha=0.0, callback_on_step_end=callback,
               callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    sigmas = get_schedule(STEPS, N_TOKENS)[:-1]
    assert [(p, s) for p, s, _, _ in seen] == [(pipe, i) for i in range(STEPS)]
    assert [t for _, _, t, _ in seen] == pytest.approx([1000 * s for s in sigmas])  # diffusers' timesteps
    assert all(keys == ["latents", "prompt_embeds"] for _, _, _, keys in seen)
    assert torch.equal(got, edit(pipe, slider_alpha=lambda i, sigma: 0.0 if i < 2 else 1.0))


def test_callback_sees_every_tensor_with_true_cfg_and_replaces_the_prompts(pipe):
    """With true CFG a callback may ask for all five tensors; embeddings it returns at step 0, of the
    positive and of the negative prompt, are what the model sees from step 1 on."""
    other, other_pooled = pipe.encode_prompt("add a hat")
    seen = []

    def callback(p, step, timestep, kwargs):
        seen.append(sorted(kwargs))
        return {"prompt_embeds": other, "negative_pooled_prompt_embeds": other_pooled} if step == 0 else None

    got = edit(pipe, slider_alpha=0.5, negative_prompt="blurry", true_cfg_scale=2.0, callback_on_step_end=callback,
               callback_on_step_end_tensor_inputs=CALLBACK_TENSOR_INPUTS)
    assert seen == [sorted(CALLBACK_TENSOR_INPUTS)] * STEPS
    replaced = {"prompt_embeds": other, "negative_pooled_prompt_embeds": other_pooled}
    expected = hand_loop(pipe, lambda i, neg: {GSTLORA: 0.5, STLORA: None}, negative_prompt="blurry",
                         true_cfg_scale=2.0, after_step_0=replaced)
    assert torch.equal(got, expected)
    assert (got - edit(pipe, slider_alpha=0.5, negative_prompt="blurry", true_cfg_scale=2.0)).abs().max() > 1e-3


def test_callback_replaces_latents(pipe):
    def callback(p, step, timestep, kwargs):
        assert kwargs["latents"].shape == (1, N_TOKENS, 64)
        return {"latents": torch.zeros_like(kwargs["latents"])} if step == STEPS - 1 else None

    got = edit(pipe, callback_on_step_end=callback)
    with torch.no_grad():
        zeros = pipe.autoencoder.decode(unpack_latents(torch.zeros(1, N_TOKENS, 64), HEIGHT, WIDTH))
    assert torch.equal(got, (zeros.float() / 2 + 0.5).clamp(0, 1))
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        edit(pipe, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["noise"])
    with pytest.raises(ValueError, match="callback_on_step_end returned 'latents'"):
        edit(pipe, num_inference_steps=1, callback_on_step_end=lambda *a: {"latents": torch.zeros(2, 2)})


# --- true CFG -------------------------------------------------------------------------------------

def test_true_cfg_matches_diffusers(tiny_kontext_dir, pipe):
    from diffusers import FluxKontextPipeline

    reference = FluxKontextPipeline.from_pretrained(tiny_kontext_dir, torch_dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    expected = reference(image=image(), prompt=PROMPT, negative_prompt="blurry and dark", true_cfg_scale=3.0,
                         num_inference_steps=STEPS, guidance_scale=2.5, height=HEIGHT, width=WIDTH, latents=noise(),
                         output_type="pt", _auto_resize=False, max_area=HEIGHT * WIDTH).images
    got = edit(pipe, negative_prompt="blurry and dark", true_cfg_scale=3.0)
    assert (got - expected).abs().max() <= 1e-4
    assert (got - edit(pipe)).abs().max() > 1e-3  # the negative branch changed the edit
    embeds, pooled = pipe.encode_prompt("blurry and dark")
    assert torch.equal(edit(pipe, negative_prompt_embeds=embeds, negative_pooled_prompt_embeds=pooled,
                            true_cfg_scale=3.0), got)


def test_negative_branch_has_no_stlora_and_the_same_gstlora(pipe):
    """The negative prompt even contains a sub-prompt's words: STLoRA spans are the positive prompt's."""
    scales = token_scales(pipe, SUBS[1:], [1.0])
    got = edit(pipe, slider_alpha=0.5, subprompts_list=SUBS[1:], slider_alpha_list=[1.0], negative_prompt="add a hat",
               true_cfg_scale=2.0)
    expected = hand_loop(pipe, lambda i, neg: {GSTLORA: 0.5, STLORA: None if neg else scales},
                         negative_prompt="add a hat", true_cfg_scale=2.0)
    assert torch.equal(got, expected)


def test_negative_prompt_is_encoded_at_the_length_of_the_prompt(pipe):
    """64 T5 tokens, from max_sequence_length or from prompt_embeds: the negative prompt too (the default
    is 512)."""
    neg, neg_pooled = pipe.encode_prompt("blurry", 64)
    expected = edit(pipe, max_sequence_length=64, negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled,
                    true_cfg_scale=2.0)
    assert torch.equal(edit(pipe, max_sequence_length=64, negative_prompt="blurry", true_cfg_scale=2.0), expected)
    embeds, pooled = pipe.encode_prompt(PROMPT, 64)
    assert torch.equal(edit(pipe, prompt=None, prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                            negative_prompt="blurry", true_cfg_scale=2.0), expected)


def test_true_cfg_needs_both_halves(pipe):
    with pytest.warns(UserWarning, match="true_cfg_scale > 1 does nothing without negative_prompt"):
        edit(pipe, num_inference_steps=1, true_cfg_scale=2.0)
    with pytest.warns(UserWarning, match="the negative prompt is ignored"):
        edit(pipe, num_inference_steps=1, negative_prompt="blurry")
    embeds, pooled = pipe.encode_prompt("blurry")
    with pytest.raises(ValueError, match="negative_prompt_embeds needs negative_pooled_prompt_embeds"):
        edit(pipe, num_inference_steps=1, negative_prompt_embeds=embeds, true_cfg_scale=2.0)
    with pytest.raises(ValueError, match="must have the shape of prompt_embeds"):
        edit(pipe, num_inference_steps=1, negative_prompt_embeds=embeds[:, :64], negative_pooled_prompt_embeds=pooled,
             true_cfg_scale=2.0)
