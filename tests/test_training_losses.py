"""The self-distillation objective: noise levels, the interpolant, PPS prompts and token spans, the loss
against an independent merged-weights oracle, and that training lowers it on a fixed batch."""
import copy
import itertools
import random

import pytest
import torch
from transformers import T5TokenizerFast

from flux_sizes import TINY_FLUX
from slideredit import Flux
from slideredit.sampling import latent_ids, text_ids
from slideredit.sliders import (GSTLORA, STLORA, adapter_parameters, init_adapter, remove_adapters, set_slider_scale,
                                slider_layers)
from slideredit.training.config import NEUTRAL_PROMPT
from slideredit.training.losses import (DistillationBatch, distillation_prompts, draw_sigmas, draw_suppressed,
                                        noisy_latents, self_distillation_loss, stlora_token_scale, stlora_token_scales,
                                        velocity)
from tiny_kontext import randomize_

PARAMS = TINY_FLUX
N, T = 6, 7  # noisy tokens (a 2 x 3 grid), text tokens


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is many times faster than two threads contending for shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sigmas_are_uniform_over_the_1000_training_levels():
    sigma = draw_sigmas(200_000, torch.Generator().manual_seed(0))
    levels = torch.round(sigma * 1000).long()
    assert sigma.dtype == torch.float32
    assert torch.equal(sigma, levels.float() / 1000)  # exactly k / 1000
    assert levels.min() == 1 and levels.max() == 1000  # 0 (a clean input) is never drawn, 1 (pure noise) is
    counts = torch.bincount(levels, minlength=1001)[1:]
    assert counts.min() > 130 and counts.max() < 270  # expected 200 each; 5 standard deviations either side


def test_noisy_latents_is_the_rectified_flow_interpolant():
    gen = torch.Generator().manual_seed(0)
    x, noise = torch.randn(3, N, 64, generator=gen), torch.randn(3, N, 64, generator=gen)
    sigma = torch.tensor([0.001, 0.5, 1.0])
    z = noisy_latents(x, noise, sigma)
    expected = (1 - sigma.double()[:, None, None]) * x.double() + sigma.double()[:, None, None] * noise.double()
    torch.testing.assert_close(z.double(), expected, rtol=0, atol=1e-6)
    assert torch.equal(z[2], noise[2])  # sigma = 1: pure noise
    assert noisy_latents(x.bfloat16(), noise.bfloat16(), sigma).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------
# PPS prompts and the suppressed spans
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def t5_tokenizer(tiny_kontext_dir):
    return T5TokenizerFast.from_pretrained(tiny_kontext_dir / "tokenizer_2")


@pytest.mark.parametrize("instructions", [
    ["make the hair curly"],
    ["add a red hat", "make the hair curly"],
    ["remove the glasses", "add a red hat", "make the person smile"],
])
def test_every_suppressed_subset_gives_the_right_prompts_and_tokens(instructions, t5_tokenizer):
    tokenize = lambda text: t5_tokenizer(text).input_ids  # noqa: E731 (with EOS, as the pipeline's)
    n = len(instructions)
    subsets = [s for k in range(1, n + 1) for s in itertools.combinations(range(n), k)]
    batch = [distillation_prompts(STLORA, instructions, suppressed, NEUTRAL_PROMPT) for suppressed in subsets]
    scales = stlora_token_scales(batch, tokenize, max_length=32)  # one micro-batch, as the training loop builds it
    assert scales.shape == (len(subsets), 32)
    for suppressed, prompts, scale in zip(subsets, batch, scales, strict=True):
        kept = [p for i, p in enumerate(instructions) if i not in suppressed]
        assert prompts.student == " and ".join(instructions)
        assert prompts.teacher == " and ".join(kept)  # "" when everything is suppressed
        assert prompts.suppressed == tuple(instructions[i] for i in suppressed)

        selected = scale.nonzero().flatten()
        ids = tokenize(prompts.student)
        assert torch.all(scale[selected] == 1.0)
        # exactly the tokens of the suppressed instructions, in order; no joiner, kept word or EOS
        assert [ids[i] for i in selected] == sum((tokenize(instructions[i])[:-1] for i in suppressed), [])
        assert torch.equal(stlora_token_scale(prompts, tokenize, max_length=32), scale)  # one sample alone


def test_gstlora_teacher_gets_the_neutral_prompt():
    prompts = distillation_prompts(GSTLORA, ["add a red hat", "make the hair curly"], (), "keep it")
    assert prompts.student == "add a red hat and make the hair curly" and prompts.teacher == "keep it"


def test_suppressed_subsets_are_nonempty_and_all_reachable():
    rng = random.Random(0)
    draws = [draw_suppressed(3, rng) for _ in range(3000)]
    assert set(draws) == {s for k in (1, 2, 3) for s in itertools.combinations(range(3), k)}
    assert draw_suppressed(1, rng) == (0,)
    with pytest.raises(ValueError, match="non-empty subset"):
        distillation_prompts(STLORA, ["a", "b"], (), NEUTRAL_PROMPT)


# ---------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------

def tiny_model(method: str, seed=0, dtype=torch.float64) -> Flux:
    model = randomize_(Flux(PARAMS), seed).to(dtype).requires_grad_(False)
    init_adapter(model, method, rank=4, generator=torch.Generator().manual_seed(seed))
    for p in adapter_parameters(model, method).values():
        p.data = p.data.to(dtype)
    return model


def fake_batch(method: str, batch=2, seed=1, dtype=torch.float64, same_prompts=False) -> DistillationBatch:
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)  # noqa: E731
    student_txt, student_vec = randn(batch, T, PARAMS.context_in_dim), randn(batch, PARAMS.vec_in_dim)
    teacher_txt, teacher_vec = ((student_txt, student_vec) if same_prompts else
                                (randn(batch, T, PARAMS.context_in_dim), randn(batch, PARAMS.vec_in_dim)))
    ids = torch.cat([latent_ids(batch, 2, 3, first_id=0), latent_ids(batch, 2, 3, first_id=1)], dim=1).to(dtype)
    scale = 1.0 if method == GSTLORA else torch.tensor([[0, 1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1, 0]] * (batch // 2),
                                                        dtype=torch.float32)
    return DistillationBatch(x=randn(batch, N, 64), noise=randn(batch, N, 64), sigma=torch.tensor([0.3, 0.8] * (batch // 2)),
                             img_ids=ids, txt_ids=text_ids(batch, T, dtype=dtype), guidance=torch.full((batch,), 3.5, dtype=dtype),
                             student_txt=student_txt, student_vec=student_vec, teacher_txt=teacher_txt,
                             teacher_vec=teacher_vec, student_scale=scale)


@pytest.mark.parametrize("method", [GSTLORA, STLORA])
def test_loss_is_zero_at_init_when_teacher_and_student_see_the_same_prompt(method):
    """B = 0: the adapter adds exact zeros, so the student computes the teacher's function. Not bit for bit:
    the adapted layers run the fused kernel (x flattened to 2-D) and the teacher plain nn.Linear on the
    3-D x, which BLAS may block differently (CPUs differ). Each velocity is then within a few fp32 ULPs
    of max |v| of the other (fp32 vs float64 here: under 4); the MSE is at most the largest squared
    difference, so loss <= (16 eps max|v|)^2. B ~ N(0, 1e-3) instead of 0 gives over 200 x that."""
    model = tiny_model(method, dtype=torch.float32)
    model.gradient_checkpointing = True
    batch = fake_batch(method, dtype=torch.float32, same_prompts=True)
    with torch.no_grad():  # the teacher's velocity, for its scale (before the loss: the scales set for the
        set_slider_scale(model, method, None)  # student's pass must stay until its checkpointed backward)
        img = torch.cat([noisy_latents(batch.x, batch.noise, batch.sigma), batch.x], dim=1)
        scale = velocity(model, img, batch, batch.teacher_txt, batch.teacher_vec).abs().max()
    loss = self_distillation_loss(model, method, batch)
    assert 0 <= loss.item() <= (16 * torch.finfo(torch.float32).eps * scale.item()) ** 2
    loss.backward()  # ... but its gradient is not zero: training can start
    grads = [p.grad for p in adapter_parameters(model, method).values() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def merged_copy(model: Flux, method: str, scale: float) -> Flux:
    """An independent oracle: the base model with scale * B A added to each adapted weight, adapters removed."""
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for _, layer in slider_layers(merged):
            adapter = layer.adapters[method]
            lora_a, lora_b = adapter.stacked(layer.out_features, adapter.rank)
            layer.weight.data = layer.weight + scale * lora_b @ lora_a
    remove_adapters(merged)
    return merged


@pytest.mark.parametrize("method", [GSTLORA, STLORA])
def test_loss_matches_a_merged_weights_oracle(method):
    model = tiny_model(method)
    with torch.no_grad():
        for name, p in adapter_parameters(model, method).items():
            if name.endswith("lora_B"):
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    batch = fake_batch(method)
    if method == STLORA:  # every text token selected: then the text-stream adapter is a merged weight
        batch.student_scale = torch.ones(2, T)
    loss = self_distillation_loss(model, method, batch)

    base, merged = copy.deepcopy(model), merged_copy(model, method, 1.0)
    remove_adapters(base)
    z = (1 - batch.sigma.double()[:, None, None]) * batch.x + batch.sigma.double()[:, None, None] * batch.noise
    common = dict(img=torch.cat([z, batch.x], dim=1), img_ids=batch.img_ids, txt_ids=batch.txt_ids,
                  timesteps=batch.sigma.double(), guidance=batch.guidance)
    with torch.no_grad():
        teacher = base(txt=batch.teacher_txt, y=batch.teacher_vec, **common)[:, :N]
        student = merged(txt=batch.student_txt, y=batch.student_vec, **common)[:, :N]
    expected = ((student - teacher) ** 2).mean()
    assert loss.dtype == torch.float32  # the MSE is taken in fp32
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0)
    assert expected > 1e-3  # not a trivially zero case


def hooked_stlora_reference(base: Flux, lora: dict[str, torch.Tensor], token_scale: torch.Tensor) -> list:
    """Forward hooks on the adapter-free model adding scale(b, t) * B (A x) to the output rows of each LoRA,
    in float64. `lora` maps "<module>.<part>.lora_A|lora_B" to tensors; the rows of part q, k, v of a
    fused qkv projection are its first, second and third `hidden` rows, "all" is every row (worked out
    here from the names, not by the library's stacking)."""
    hidden = PARAMS.hidden_size
    rows_of = {"q": slice(0, hidden), "k": slice(hidden, 2 * hidden), "v": slice(2 * hidden, 3 * hidden),
               "all": slice(None)}
    per_module: dict[str, list] = {}
    for name, a in lora.items():
        if name.endswith(".lora_A"):
            module, part = name[:-len(".lora_A")].rsplit(".", 1)
            b = lora[name[:-len("lora_A")] + "lora_B"]
            per_module.setdefault(module, []).append((a.double(), b.double(), rows_of[part]))

    def hook(module, args, out, loras):
        x = args[0]  # (B, T, d_in): these layers see the text tokens only
        out = out.clone()
        for a, b, rows in loras:
            out[..., rows] += token_scale.double()[..., None] * (x @ a.T @ b.T)
        return out

    return [base.get_submodule(m).register_forward_hook(lambda mod, args, out, loras=loras: hook(mod, args, out, loras))
            for m, loras in per_module.items()]


def test_stlora_loss_with_partial_token_selection_matches_a_hooked_reference():
    """The adapter acts on the selected text tokens only (here 2 of 7 and 3 of 7), checked against
    forward hooks on the plain model; selecting every token would give a clearly different loss."""
    model = tiny_model(STLORA)
    with torch.no_grad():
        for name, p in adapter_parameters(model, STLORA).items():
            if name.endswith("lora_B"):
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    lora = {name: p.detach().clone() for name, p in adapter_parameters(model, STLORA).items()}
    batch = fake_batch(STLORA)
    selected = batch.student_scale
    assert 0 < selected.sum() < selected.numel()  # a partial selection: some tokens on, some off
    loss = self_distillation_loss(model, STLORA, batch)

    base = copy.deepcopy(model)
    remove_adapters(base)
    z = (1 - batch.sigma.double()[:, None, None]) * batch.x + batch.sigma.double()[:, None, None] * batch.noise
    common = dict(img=torch.cat([z, batch.x], dim=1), img_ids=batch.img_ids, txt_ids=batch.txt_ids,
                  timesteps=batch.sigma.double(), guidance=batch.guidance)

    def reference_loss(token_scale):
        with torch.no_grad():
            teacher = base(txt=batch.teacher_txt, y=batch.teacher_vec, **common)[:, :N]
            handles = hooked_stlora_reference(base, lora, token_scale)
            try:
                student = base(txt=batch.student_txt, y=batch.student_vec, **common)[:, :N]
            finally:
                for h in handles:
                    h.remove()
        return ((student - teacher) ** 2).mean()

    expected, every_token = reference_loss(selected), reference_loss(torch.ones_like(selected))
    # The library rounds the float64 velocities to fp32 and averages in fp32: a relative error of a few
    # fp32 ULPs per term, log2(768) pairwise-summation levels; 1e-6 is ~8 eps.
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0)
    assert abs(every_token - expected) > 1e-2 * expected  # the selection matters far beyond the tolerance


@pytest.mark.parametrize("method", [GSTLORA, STLORA])
def test_training_lowers_the_loss_on_a_fixed_batch(method):
    model = tiny_model(method, dtype=torch.float32)
    model.gradient_checkpointing = True
    params = list(adapter_parameters(model, method).values())
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-4)
    batch = fake_batch(method, dtype=torch.float32)
    losses = []
    for _ in range(40):
        loss = self_distillation_loss(model, method, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[0] > 0
    assert losses[-1] < 0.5 * losses[0], losses
