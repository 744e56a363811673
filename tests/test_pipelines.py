"""The editing pipeline against diffusers' FluxKontextPipeline on a complete tiny model folder."""
import inspect
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fake_hub import unreachable_hub  # noqa: F401 (a fixture)
from slideredit import CheckpointError
from slideredit.pipelines import ScheduleConfig, SliderEditFluxKontextPipeline
from slideredit.sampling import get_schedule
from test_sampling import diffusers_scheduler
from tiny_kontext import SCHEDULER_CONFIG

PROMPT = "make the hair red and add a hat"


@pytest.fixture(scope="module")
def reference(tiny_kontext_dir):
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(tiny_kontext_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ours(tiny_kontext_dir):
    pipe = SliderEditFluxKontextPipeline.from_pretrained(tiny_kontext_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, len(mode)), dtype=np.uint8)
    return Image.fromarray(pixels, mode)


@pytest.mark.parametrize("width, height, prompts", [
    (64, 64, PROMPT),                              # square
    (80, 48, PROMPT),                              # non-square
    (48, 64, [PROMPT, "turn it into a painting"]),  # batch 2
])
def test_matches_diffusers(reference, ours, width, height, prompts):
    image = random_image(width + 8, height + 5)  # not a multiple of 16: both floor the context image
    batch = 1 if isinstance(prompts, str) else len(prompts)
    latents = torch.randn(batch, (height // 16) * (width // 16), 64, generator=torch.Generator().manual_seed(1))
    common = dict(image=image, prompt=prompts, height=height, width=width, num_inference_steps=3,
                  guidance_scale=2.5, latents=latents, output_type="pt")
    expected = reference(**common, _auto_resize=False, max_area=height * width).images
    got = ours(**common, auto_resize=False).images
    assert got.shape == expected.shape == (batch, 3, height, width)
    assert (got - expected).abs().max() <= 1e-4


def test_same_seed_same_image_and_pil_output(ours):
    image = random_image(64, 48)
    run = lambda seed: ours(image=image, prompt=PROMPT, num_inference_steps=2, auto_resize=False,
                            generator=torch.Generator().manual_seed(seed)).images
    first, second, other = run(7), run(7), run(8)
    assert isinstance(first[0], Image.Image) and first[0].size == (64, 48)
    assert np.array_equal(np.asarray(first[0]), np.asarray(second[0]))
    assert not np.array_equal(np.asarray(first[0]), np.asarray(other[0]))


def test_default_output_keeps_the_aspect_ratio_at_one_megapixel(ours):
    """A 3:2 input gives the nearest preferred Kontext size (1248x832), not diffusers' fixed 1024x1024."""
    out = ours(image=random_image(300, 200), prompt=PROMPT, num_inference_steps=1).images[0]
    assert out.size == (1248, 832)


def test_explicit_size_wins(ours):
    out = ours(image=random_image(64, 64), prompt=PROMPT, num_inference_steps=1, height=32, width=48,
               auto_resize=False).images[0]
    assert out.size == (48, 32)


def test_release_call_with_its_defaults_matches_diffusers(reference, ours):
    """The release's call spelled as diffusers spells it, with no guidance_scale (both default to 3.5):
    max_area scales the 48x32 asked for to 96x64 pixels, _auto_resize=False keeps the context's size."""
    latents = torch.randn(1, (64 // 16) * (96 // 16), 64, generator=torch.Generator().manual_seed(2))
    call = dict(image=random_image(53, 37), prompt=PROMPT, height=32, width=48, max_area=64 * 96,
                _auto_resize=False, num_inference_steps=3, latents=latents, output_type="pt")
    expected, got = reference(**call).images, ours(**call).images
    assert got.shape == expected.shape == (1, 3, 64, 96)
    assert (got - expected).abs().max() <= 1e-4


# Defaults that differ from diffusers' on purpose: None takes the model folder's slideredit.json
# (max_sequence_length 512, _auto_resize True for FLUX.1 Kontext [dev]); max_area None keeps the size asked for.
OWN_DEFAULTS = {"max_sequence_length", "_auto_resize", "max_area"}


def test_shared_arguments_have_diffusers_defaults():
    from diffusers import FluxKontextPipeline

    def defaults(function) -> dict:
        return {name: tuple(p.default) if isinstance(p.default, list) else p.default
                for name, p in inspect.signature(function).parameters.items()}

    theirs, mine = defaults(FluxKontextPipeline.__call__), defaults(SliderEditFluxKontextPipeline.__call__)
    shared = set(theirs) & set(mine) - OWN_DEFAULTS
    assert {"guidance_scale", "num_inference_steps", "true_cfg_scale", "height", "width"} <= shared
    assert {name: mine[name] for name in shared} == {name: theirs[name] for name in shared}


class _Sizes(Exception):
    pass


def diffusers_sizes(reference, monkeypatch, image: Image.Image, **call) -> tuple[tuple[int, int], tuple[int, int]]:
    """(output (W, H), resized context (W, H)) chosen by diffusers' FluxKontextPipeline, caught where it
    prepares the latents (before its VAE or transformer run)."""
    def capture(image, batch_size, num_channels_latents, height, width, *args, **kwargs):
        raise _Sizes((width, height), (image.shape[-1], image.shape[-2]))

    monkeypatch.setattr(reference, "prepare_latents", capture)
    with pytest.raises(_Sizes) as sizes:
        reference(image=image, prompt=PROMPT, num_inference_steps=1, **call)
    return sizes.value.args


def our_sizes(ours, monkeypatch, image: Image.Image, **call) -> tuple[tuple[int, int], tuple[int, int]]:
    """(output (W, H), resized context (W, H)) chosen by our pipeline, caught where it draws the noise;
    the autoencoder only records the context's size (zero latents), so one-megapixel contexts cost nothing."""
    context = []

    def encode(pixels):
        context.append((pixels.shape[-1], pixels.shape[-2]))
        return torch.zeros(pixels.shape[0], 16, pixels.shape[-2] // 8, pixels.shape[-1] // 8)

    def capture(batch, rows, height, width, generator):
        raise _Sizes((width, height), context[0])

    monkeypatch.setattr(ours.autoencoder, "encode", encode)
    monkeypatch.setattr(ours, "_noise", capture)
    with pytest.raises(_Sizes) as sizes:
        ours(image=image, prompt=PROMPT, num_inference_steps=1, **call)
    return sizes.value.args


@pytest.mark.parametrize("image_size, call", [
    ((517, 301), dict(height=300, width=500, max_area=512 ** 2, _auto_resize=True)),
    ((517, 301), dict(height=300, width=500, max_area=100_000, _auto_resize=False)),
    ((301, 517), dict(height=1000, width=600, max_area=1024 ** 2)),  # _auto_resize: True in both by default
    ((333, 777), dict(height=333, width=777, max_area=12_345, _auto_resize=False)),
    ((1000, 1000), dict(max_area=261_837, _auto_resize=False)),  # sqrt = 511.7: rounds up to 512, not 496
    ((777, 777), dict()),  # the release's plain call on a square image: 1024x1024 in both
])
def test_output_and_context_sizes_match_diffusers(reference, ours, monkeypatch, image_size, call):
    image = random_image(*image_size)
    assert our_sizes(ours, monkeypatch, image, **call) == diffusers_sizes(reference, monkeypatch, image, **call)


def test_max_area_keeps_the_aspect_ratio_of_the_default_size(reference, ours, monkeypatch):
    """Without height/width our default size has the context's aspect ratio (3:2 here, snapped to
    1248x832), and max_area scales that: round(sqrt(65536 x 1.5)) = 314 -> 304, round(sqrt(65536 / 1.5))
    = 209 -> 208. diffusers scales its fixed 1024x1024 to a square instead."""
    image = random_image(300, 200)
    assert our_sizes(ours, monkeypatch, image, max_area=256 ** 2) == ((304, 208), (1248, 832))
    assert diffusers_sizes(reference, monkeypatch, image, max_area=256 ** 2) == ((256, 256), (1248, 832))


def test_bad_size_arguments_are_one_line_errors(ours, monkeypatch):
    monkeypatch.setattr(ours.text_encoders, "encode", lambda *a, **k: pytest.fail("encoded before validating"))
    call = dict(image=random_image(32, 32), prompt=PROMPT, num_inference_steps=1)
    for bad in (0, -4096, math.nan, "4096", True):
        with pytest.raises(ValueError, match="max_area must be a (finite|positive) number"):
            ours(**call, max_area=bad)
    with pytest.raises(ValueError, match="auto_resize or _auto_resize"):
        ours(**call, auto_resize=False, _auto_resize=False)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="max_area=100 at aspect 1 gives a 0x0 output"):
        ours(**call, max_area=100, auto_resize=False)
    with pytest.raises(ValueError, match="height and width must be positive to scale them to max_area, got 32x0"):
        ours(**call, max_area=4096, height=0, width=32, auto_resize=False)


def test_half_a_size_is_refused_before_encoding_and_a_tiny_size_in_one_line(ours, monkeypatch):
    monkeypatch.setattr(ours.text_encoders, "encode", lambda *a, **k: pytest.fail("encoded before validating"))
    call = dict(image=random_image(32, 32), prompt=PROMPT, num_inference_steps=1)
    with pytest.raises(ValueError, match="give both height and width or neither; got height=32, width=None"):
        ours(**call, height=32)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="output must be at least 16x16 pixels, got 32x0"):
        ours(**call, height=8, width=32)


def test_the_folders_schedule_shifts_match_diffusers(tmp_path):
    """A scheduler_config.json with other shifts than FLUX.1's: the pipeline's timesteps are the sigmas
    diffusers' scheduler and FluxKontextPipeline's calculate_shift give for that file."""
    config = {**SCHEDULER_CONFIG, "base_image_seq_len": 128, "max_image_seq_len": 2048, "base_shift": 0.3,
              "max_shift": 2.0}
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    timesteps = torch.tensor(ScheduleConfig.from_folder(tmp_path).timesteps(6, 1500), dtype=torch.float64)
    assert torch.allclose(timesteps, diffusers_scheduler(6, 1500, config).sigmas.double(), atol=1e-6, rtol=0)
    assert (timesteps - torch.tensor(get_schedule(6, 1500), dtype=torch.float64)).abs().max() > 0.05


def test_prompt_embeds_skip_the_encoders(ours, monkeypatch):
    embeds, pooled = ours.encode_prompt(PROMPT)
    common = dict(image=random_image(48, 48), num_inference_steps=2, auto_resize=False, output_type="pt")
    expected = ours(prompt=PROMPT, generator=torch.Generator().manual_seed(3), **common).images
    monkeypatch.setattr(ours.text_encoders, "encode", lambda *a, **k: pytest.fail("text encoders ran"))
    got = ours(prompt_embeds=embeds, pooled_prompt_embeds=pooled, generator=torch.Generator().manual_seed(3),
               **common).images
    assert torch.equal(got, expected)


def test_offload_keeps_text_encoders_on_cpu(tiny_kontext_dir):
    pipe = SliderEditFluxKontextPipeline.from_pretrained(tiny_kontext_dir, torch_dtype=torch.float32, offload=True)
    pipe.set_progress_bar_config(disable=True)
    moves = []
    original = pipe.text_encoders.to
    pipe.text_encoders.to = lambda device: moves.append(str(device)) or original(device)
    pipe(image=random_image(32, 32), prompt=PROMPT, num_inference_steps=1, auto_resize=False)
    assert moves == ["cpu", "cpu"]  # to the pipeline's device (the CPU here) for encoding, then back
    assert next(pipe.text_encoders.parameters()).device.type == "cpu"


def test_progress_bar_can_be_silenced(ours, capsys):
    ours.set_progress_bar_config(disable=False)
    ours(image=random_image(32, 32), prompt=PROMPT, num_inference_steps=2, auto_resize=False)
    assert "denoising" in capsys.readouterr().err
    ours.set_progress_bar_config(disable=True)
    ours(image=random_image(32, 32), prompt=PROMPT, num_inference_steps=2, auto_resize=False)
    assert "denoising" not in capsys.readouterr().err


def test_release_import_path():
    import slideredit
    from slideredit.pipelines import SliderEditFluxKontextPipeline as from_release_path

    assert slideredit.SliderEditFluxKontextPipeline is from_release_path


def test_bad_inputs(ours, tmp_path):
    with pytest.raises(ValueError, match="at least 16 pixels"):
        ours(image=random_image(12, 40), prompt=PROMPT, num_inference_steps=1)
    not_an_image = tmp_path / "photo.png"
    not_an_image.write_text("this is not a PNG")
    with pytest.raises(ValueError, match="photo.png"):
        ours(image=not_an_image, prompt=PROMPT, num_inference_steps=1)
    with pytest.raises(ValueError, match="latents must be packed"):
        ours(image=random_image(32, 32), prompt=PROMPT, auto_resize=False, latents=torch.zeros(1, 5, 64))
    with pytest.raises(ValueError, match="output_type"):
        ours(image=random_image(32, 32), prompt=PROMPT, output_type="np")


def test_missing_model_folder(tmp_path):
    with pytest.raises(CheckpointError, match="model folder not found"):
        SliderEditFluxKontextPipeline.from_pretrained(tmp_path / "nope")


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=""), r"prompt is empty \(''\)"), (dict(prompt=" \n"), "prompt is blank"),
    (dict(prompt=[PROMPT, "  "]), r"prompt\[1\] is blank"),
    (dict(prompt=PROMPT, subprompts_list=["add a hat", " "], slider_alpha_list=[0, 1]),
     r"subprompts_list\[1\] is blank"),
])
def test_empty_or_blank_instructions_are_refused(ours, monkeypatch, kwargs, message):
    monkeypatch.setattr(ours.text_encoders, "encode", lambda *a, **k: pytest.fail("encoded before validating"))
    with pytest.raises(ValueError, match=message):
        ours(image=random_image(32, 32), num_inference_steps=1, **kwargs)


@pytest.mark.parametrize("offline", [False, True])
def test_an_unreachable_hub_stops_from_pretrained_at_once(unreachable_hub, monkeypatch, offline):
    """The hub client retried a refused connection for about 30 s before its error."""
    import slideredit.pipelines as pipelines

    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(pipelines, "download_from_hub", lambda *a, **k: pytest.fail("went on to download"))
    with pytest.raises(CheckpointError) as caught:
        SliderEditFluxKontextPipeline.from_pretrained("nobody/not-cached-kontext")
    assert unreachable_hub == ([] if offline else
                               ["http://127.0.0.1:9/nobody/not-cached-kontext/resolve/main/model_index.json"])
    message = str(caught.value)
    assert "\n" not in message and "FLUX.1 Kontext model 'nobody/not-cached-kontext'" in message
    assert ("HF_HUB_OFFLINE is set" if offline else "127.0.0.1:9 is unreachable") in message


def test_guidance_must_be_finite(ours, monkeypatch):
    monkeypatch.setattr(ours.text_encoders, "encode", lambda *a, **k: pytest.fail("encoded before validating"))
    for name in ("guidance_scale", "true_cfg_scale"):
        for bad in (math.nan, math.inf, "2.5"):
            with pytest.raises(ValueError, match=f"{name} must be a finite number"):
                ours(image=random_image(32, 32), prompt=PROMPT, num_inference_steps=1, **{name: bad})


def test_unavailable_device_is_refused_before_loading(tiny_kontext_dir, monkeypatch):
    import slideredit.pipelines as pipelines

    monkeypatch.setattr(pipelines, "load_flux", lambda *a, **k: pytest.fail("loaded before checking the device"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only torch, on any machine
    with pytest.raises(ValueError, match="device 'cuda' is not available"):
        SliderEditFluxKontextPipeline.from_pretrained(tiny_kontext_dir, device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="'cuda:3' is not available: this machine has 1 cuda device"):
        SliderEditFluxKontextPipeline.from_pretrained(tiny_kontext_dir, device="cuda:3")
    with pytest.raises(ValueError, match="'gpu' is not a torch device"):
        SliderEditFluxKontextPipeline.from_pretrained(tiny_kontext_dir, device="gpu")


def test_truncated_text_encoder_is_one_clear_error_before_loading(tiny_kontext_dir, tmp_path, monkeypatch):
    import slideredit.pipelines as pipelines

    folder = tmp_path / "model"
    folder.mkdir()
    for entry in tiny_kontext_dir.iterdir():
        if entry.name != "text_encoder_2":
            (folder / entry.name).symlink_to(entry)
    shutil.copytree(tiny_kontext_dir / "text_encoder_2", folder / "text_encoder_2")
    weights = folder / "text_encoder_2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted download
    monkeypatch.setattr(pipelines, "load_flux", lambda *a, **k: pytest.fail("loaded before checking the encoders"))
    with pytest.raises(CheckpointError, match="text_encoder_2/model.safetensors: not a readable safetensors") as err:
        SliderEditFluxKontextPipeline.from_pretrained(folder)
    assert "\n" not in str(err.value)
