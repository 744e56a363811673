"""slideredit.evaluation: continuity and monotonicity by hand, the sweep format, every evaluator against a
hand computation from a tiny random-weight model (no network), the optional extras, the PIL plot."""
from __future__ import annotations

import io
import json
import math
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from slideredit.evaluation import (ArcFaceDistance, BlipItmScore, ClipScore, DinoDistance, EvaluatorLoadError,
                                   LpipsDistance, MissingExtraError, SiglipScore, Sweep, SweepCell, SweepFormatError,
                                   average_ranks, continuity_score, draw_curves, monotonicity_score, read_sweep,
                                   spearman, write_sweep)

WORDS = ["curly", "hair", "a", "big", "smile", "make", "the", "add", "glasses", "old", "person", "blue", "sky"]


# ---------------------------------------------------------------------------------------------------
# Tiny models with their processors, saved as hub-style folders (shared with test_eval_script.py)
# ---------------------------------------------------------------------------------------------------

def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Spread every weight: a fresh init (std 0.02, zero biases) makes all scores nearly equal."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_norm_scale = "norm" in name.lower() and name.endswith("weight")
            param.copy_(1 + 0.1 * noise if is_norm_scale else 0.3 * noise)
    return model.eval()


def _clip_vocab() -> dict[str, int]:
    """Byte-level BPE vocabulary with no merges: the 256 byte characters, each also with </w>."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    chars = [chr(code) for code in codes]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


def _spiece_model(path: Path) -> None:
    import sentencepiece as spm

    sentences = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 10
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buffer, vocab_size=60,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    path.write_bytes(buffer.getvalue())


def build_tiny_models(root: Path) -> dict[str, Path]:
    """Tiny CLIP, SigLIP, BLIP-ITM and DINOv2 folders (config, weights, processor) under `root`."""
    from transformers import (BertTokenizer, BitImageProcessor, BlipConfig, BlipForImageTextRetrieval,
                              BlipImageProcessor, BlipProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel,
                              CLIPProcessor, CLIPTokenizer, Dinov2Config, Dinov2Model, SiglipConfig,
                              SiglipImageProcessor, SiglipModel, SiglipProcessor, SiglipTokenizer)

    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    vision = dict(tower, image_size=32, patch_size=8)
    folders = {name: root / name for name in ("clip", "siglip", "blip", "dino")}

    vocab = _clip_vocab()
    clip_tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    clip = CLIPModel(CLIPConfig(text_config=dict(tower, vocab_size=len(vocab), max_position_embeddings=77,
                                                 bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                                                 pad_token_id=vocab["<|endoftext|>"]),
                                vision_config=vision, projection_dim=16))
    _randomise(clip, 0).save_pretrained(folders["clip"])
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=clip_tokenizer).save_pretrained(folders["clip"])

    folders["siglip"].mkdir(parents=True)
    _spiece_model(folders["siglip"] / "spiece.model")
    siglip_tokenizer = SiglipTokenizer(vocab_file=str(folders["siglip"] / "spiece.model"))
    siglip = SiglipModel(SiglipConfig(text_config=dict(tower, vocab_size=siglip_tokenizer.vocab_size,
                                                       max_position_embeddings=64), vision_config=vision))
    _randomise(siglip, 1).save_pretrained(folders["siglip"])
    SiglipProcessor(image_processor=SiglipImageProcessor(size={"height": 32, "width": 32}),
                    tokenizer=siglip_tokenizer).save_pretrained(folders["siglip"])

    bert_words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    blip = BlipForImageTextRetrieval(BlipConfig(
        text_config=dict(tower, vocab_size=len(bert_words), encoder_hidden_size=32, max_position_embeddings=64),
        vision_config=vision, image_text_hidden_size=16))
    _randomise(blip, 2).save_pretrained(folders["blip"])
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=BertTokenizer(vocab={w: i for i, w in enumerate(bert_words)})).save_pretrained(folders["blip"])

    dino = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                    image_size=32, patch_size=8))
    _randomise(dino, 3).save_pretrained(folders["dino"])
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folders["dino"])
    return folders


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"))


def random_images(count: int, seed: int = 0) -> list[Image.Image]:
    """Noise images of varied sizes and modes (RGBA and greyscale included: evaluators convert to RGB)."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        height, width = 32 + 8 * (index % 3), 40 + 4 * index
        images.append(Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)))
    images[1 % count] = images[1 % count].convert("RGBA")
    return images


TEXTS = ["curly hair", "a big smile", "make the hair curly", "add glasses", "old person"]


# ---------------------------------------------------------------------------------------------------
# Continuity and monotonicity
# ---------------------------------------------------------------------------------------------------

def test_continuity_of_evenly_spread_scores_is_zero():
    assert continuity_score(np.linspace(0, 1, 5)) == 0.0
    # Any order, scale and offset: the measure only sees how the scores fill their range.
    assert continuity_score([3.0, -1.0, 7.0, 1.0, 5.0, 9.0]) == 0.0


def test_continuity_extremes():
    # All but one score at one end, m = 5: counts (4, 0, 0, 0, 1), n/m = 1:
    # chi^2 = 9 + 1 + 1 + 1 + 0 = 12, / (m - 1) = 3 = m - 2, the worst non-constant sweep.
    assert continuity_score([0.1, 0.1, 0.1, 0.1, 0.8]) == pytest.approx(3.0)
    assert continuity_score([0.8, 0.1, 0.1, 0.1, 0.1]) == pytest.approx(3.0)
    # All-equal scores are defined to fall into one bin: counts (5, 0, 0, 0, 0), chi^2 = 16 + 4 = 20, / 4 = 5.
    assert continuity_score([0.3] * 5) == pytest.approx(5.0)
    assert continuity_score([2.0, 2.0]) == pytest.approx(2.0)


def test_continuity_worked_example():
    # m = 6, min 0.2, max 1.0: normalised 0, .125, .375, .875, 1, 1; bins of width 1/6:
    # counts (2, 0, 1, 0, 0, 3) -> chi^2 = 1 + 1 + 0 + 1 + 1 + 4 = 8, / 5 = 1.6.
    assert continuity_score([0.2, 0.3, 0.5, 0.9, 1.0, 1.0]) == pytest.approx(1.6)
    # m = 4: scores 0, 0.1, 0.2, 1 -> normalised 0, .1, .2, 1; bins of width .25: counts (3, 0, 0, 1)
    # -> chi^2 = 4 + 1 + 1 + 0 = 6, / 3 = 2.
    assert continuity_score([0.0, 0.1, 0.2, 1.0]) == pytest.approx(2.0)


def test_continuity_bad_input():
    assert math.isnan(continuity_score([0.1, float("nan"), 0.3]))
    with pytest.raises(ValueError, match="at least 2"):
        continuity_score([0.5])
    with pytest.raises(ValueError, match="1-D"):
        continuity_score([[0.1, 0.2], [0.3, 0.4]])


def test_average_ranks_share_ties():
    np.testing.assert_array_equal(average_ranks([5, 7, 5]), [1.5, 3, 1.5])
    np.testing.assert_array_equal(average_ranks([2, 2, 2, 1]), [3, 3, 3, 1])
    np.testing.assert_array_equal(average_ranks([0.3, 0.1, 0.2]), [3, 1, 2])


def test_spearman_hand_examples():
    # No ties: d = (-1, 1, -1, 1, 0), rho = 1 - 6 * 4 / (5 * 24) = 0.8.
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    # Ties: y ranks (1, 2.5, 2.5, 4); centred x ranks (-1.5, -.5, .5, 1.5), y ranks (-1.5, 0, 0, 1.5):
    # rho = 4.5 / sqrt(5 * 4.5) = sqrt(0.9).
    assert spearman([1, 2, 3, 4], [10, 20, 20, 30]) == pytest.approx(math.sqrt(0.9))
    assert monotonicity_score([-1, -0.5, 0, 0.5, 1], [0.9, 0.7, 0.4, 0.39, 0.1]) == pytest.approx(-1.0)
    # Ranks only: any increasing transform of the scores gives the same value.
    scores = [0.3, 0.1, 0.5, 0.2, 0.4]
    assert spearman([1, 2, 3, 4, 5], np.exp(scores)) == pytest.approx(spearman([1, 2, 3, 4, 5], scores))


def test_spearman_undefined_cases():
    assert math.isnan(spearman([1, 2, 3], [4, 4, 4]))
    assert math.isnan(spearman([1, 2, 3], [4, float("nan"), 5]))
    with pytest.raises(ValueError, match="same length"):
        spearman([1, 2, 3], [1, 2])


# ---------------------------------------------------------------------------------------------------
# The sweep folder
# ---------------------------------------------------------------------------------------------------

def make_sweep_folder(folder: Path, grid: list[tuple[float, ...]], method: str = "gstlora",
                      subprompts: list[str] | None = None, seed: int = 0, model: str = "tiny/kontext") -> Sweep:
    """A sweep folder as infer.py writes it: source.png, cells/*.png (noise) and sweep.json."""
    (folder / "cells").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    noise = lambda: Image.fromarray(rng.integers(0, 256, (36, 44, 3), dtype=np.uint8))
    noise().save(folder / "source.png")
    cells = []
    for index, alphas in enumerate(grid):
        name = f"cells/{index:02d}.png"
        noise().save(folder / name)
        cells.append(SweepCell(tuple(alphas), name))
    sweep = Sweep(source_image="source.png", prompt=" and ".join(subprompts) if subprompts else "make the hair curly",
                  subprompts=subprompts, seed=seed, method=method, model=model, steps=4, guidance=2.5, cells=cells)
    write_sweep(folder, sweep)
    return sweep


def test_sweep_round_trip(tmp_path):
    sweep = make_sweep_folder(tmp_path, [(-1.0, 0.0), (0.0, 0.0), (0.5, 1.0)], method="stlora",
                              subprompts=["make the hair curly", "add a smile"])
    assert read_sweep(tmp_path) == sweep
    assert sweep.num_sliders == 2
    record = json.loads((tmp_path / "sweep.json").read_text())
    assert record["cells"][2] == {"alphas": [0.5, 1.0], "image": "cells/02.png"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells", "source.png", "sweep.json"]  # no temp file left


def test_write_sweep_is_atomic(tmp_path, monkeypatch):
    sweep = make_sweep_folder(tmp_path, [(-1.0,), (1.0,)])
    before = (tmp_path / "sweep.json").read_text()

    def broken_dump(record, file, **kwargs):
        file.write('{"source_image": ')  # half a record, then the writer dies
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", broken_dump)
    sweep.seed = 7
    with pytest.raises(OSError, match="disk full"):
        write_sweep(tmp_path, sweep)
    assert (tmp_path / "sweep.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells", "source.png", "sweep.json"]


def test_sweep_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no sweep.json"):
        read_sweep(tmp_path)
    sweep = make_sweep_folder(tmp_path / "s", [(-1.0,), (1.0,)])
    path = tmp_path / "s" / "sweep.json"
    record = json.loads(path.read_text())

    (tmp_path / "s" / "cells" / "01.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"cells\[1\].image 'cells/01.png' does not exist"):
        read_sweep(tmp_path / "s")
    for change, message in [({"cells": [{"alphas": [0.0, 1.0], "image": "cells/00.png"}]}, r"cells\[0\].alphas must be 1"),
                            ({"method": "lora"}, "method must be one of"),
                            ({"method": "stlora", "subprompts": None}, "needs subprompts"),
                            ({"seed": "zero"}, "seed must be an integer")]:
        path.write_text(json.dumps(record | change))
        with pytest.raises(SweepFormatError, match=message):
            read_sweep(tmp_path / "s")
    path.write_text(json.dumps({k: v for k, v in record.items() if k != "guidance"}))
    with pytest.raises(SweepFormatError, match="missing field.*guidance"):
        read_sweep(tmp_path / "s")
    path.write_text("{not json")
    with pytest.raises(SweepFormatError, match="not valid JSON"):
        read_sweep(tmp_path / "s")
    Image.new("RGB", (8, 8)).save(tmp_path / "s" / "cells" / "01.png")
    sweep.cells.append(SweepCell((0.0,), "cells/missing.png"))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        write_sweep(tmp_path / "s", sweep)


# ---------------------------------------------------------------------------------------------------
# Evaluators against hand computations
# ---------------------------------------------------------------------------------------------------

def _check_batching_and_pairing(evaluator_class, folder: Path, second: list, low: float, high: float) -> torch.Tensor:
    """Same numbers for batch sizes 2 and 16, image i paired with item i, values within [low, high]."""
    images = random_images(5)
    small, large = evaluator_class(folder, batch_size=2), evaluator_class(folder, batch_size=16)
    result = small(images, second)
    assert result.shape == (5,) and result.dtype == torch.float32
    torch.testing.assert_close(result, large(images, second), atol=1e-5, rtol=0)
    torch.testing.assert_close(result[3:4], large([images[3]], [second[3]]), atol=1e-5, rtol=0)
    assert low <= result.min() and result.max() <= high
    assert result.std() > 1e-4  # random weights still tell the pairs apart
    return result


def test_clip_score_is_the_cosine_of_projected_embeddings(tiny):
    from transformers import AutoProcessor, CLIPModel

    image, text = random_images(1)[0], "curly hair"
    model, processor = CLIPModel.from_pretrained(tiny["clip"]).eval(), AutoProcessor.from_pretrained(tiny["clip"])
    with torch.no_grad():
        pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
        tokens = processor(text=[text], return_tensors="pt")
        image_embed = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text_embed = model.text_projection(model.text_model(**tokens).pooler_output)
    expected = F.cosine_similarity(image_embed.double(), text_embed.double())
    torch.testing.assert_close(ClipScore(tiny["clip"])([image], text).double(), expected, atol=1e-5, rtol=0)
    _check_batching_and_pairing(ClipScore, tiny["clip"], TEXTS, -1, 1)


def test_siglip_score_is_the_sigmoid_of_the_pair_logit(tiny):
    from transformers import AutoProcessor, SiglipModel

    image, text = random_images(1)[0], "curly hair"
    model, processor = SiglipModel.from_pretrained(tiny["siglip"]).eval(), AutoProcessor.from_pretrained(tiny["siglip"])
    with torch.no_grad():
        pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
        ids = processor(text=[text], padding="max_length", return_tensors="pt")["input_ids"]
        assert ids.shape == (1, 64)  # SigLIP's text length; padded with EOS, no mask
        image_embed = F.normalize(model.vision_model(pixel_values=pixels).pooler_output.double(), dim=-1)
        text_embed = F.normalize(model.text_model(input_ids=ids).pooler_output.double(), dim=-1)
        logit = (image_embed * text_embed).sum(-1) * model.logit_scale.double().exp() + model.logit_bias.double()
    torch.testing.assert_close(SiglipScore(tiny["siglip"])([image], text).double(), logit.sigmoid(), atol=1e-5, rtol=0)
    _check_batching_and_pairing(SiglipScore, tiny["siglip"], TEXTS, 0, 1)


def test_blip_score_is_the_itm_match_probability(tiny):
    from transformers import AutoProcessor, BlipForImageTextRetrieval

    image, text = random_images(1)[0], "curly hair"
    model = BlipForImageTextRetrieval.from_pretrained(tiny["blip"]).eval()
    processor = AutoProcessor.from_pretrained(tiny["blip"])
    with torch.no_grad():
        pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
        tokens = processor(text=[text], return_tensors="pt")
        image_states = model.vision_model(pixel_values=pixels).last_hidden_state
        text_states = model.text_encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                         encoder_hidden_states=image_states,
                                         encoder_attention_mask=torch.ones(image_states.shape[:2], dtype=torch.long)
                                         ).last_hidden_state
        logits = model.itm_head(text_states[:, 0]).double()  # (no match, match) from the [CLS] state
    expected = logits.exp()[:, 1] / logits.exp().sum(-1)
    torch.testing.assert_close(BlipItmScore(tiny["blip"])([image], text).double(), expected, atol=1e-5, rtol=0)
    _check_batching_and_pairing(BlipItmScore, tiny["blip"], TEXTS, 0, 1)


def test_dino_distance_is_one_minus_cls_cosine(tiny):
    from transformers import AutoImageProcessor, Dinov2Model

    image, source = random_images(2)
    model, processor = Dinov2Model.from_pretrained(tiny["dino"]).eval(), AutoImageProcessor.from_pretrained(tiny["dino"])
    with torch.no_grad():
        pixels = processor(images=[image, source], return_tensors="pt")["pixel_values"]
        cls = model(pixel_values=pixels).last_hidden_state[:, 0]
    expected = 1 - F.cosine_similarity(cls[:1].double(), cls[1:].double())
    distance = DinoDistance(tiny["dino"])
    torch.testing.assert_close(distance([image], source).double(), expected, atol=1e-5, rtol=0)
    assert distance([source], source).abs().max() < 1e-5  # an image is at distance 0 from itself
    sources = random_images(5, seed=1)
    result = _check_batching_and_pairing(DinoDistance, tiny["dino"], sources, 0, 2)
    images = random_images(5)
    torch.testing.assert_close(distance(images, sources[0]), distance(images, [sources[0]] * 5), atol=1e-5, rtol=0)
    assert result.min() > 0


def test_evaluator_input_and_load_errors(tiny, tmp_path):
    clip = ClipScore(tiny["clip"])
    with pytest.raises(ValueError, match="one str or a list of 2"):
        clip(random_images(2), ["curly hair"])
    with pytest.raises(TypeError, match="list of PIL images"):
        clip(random_images(1)[0], "curly hair")
    with pytest.raises(TypeError, match=r"sources\[1\] must be of type Image, got str"):
        DinoDistance(tiny["dino"])(random_images(2), [random_images(1)[0], "source.png"])
    with pytest.raises(EvaluatorLoadError, match="'siglip' model, but this evaluator needs CLIPModel"):
        ClipScore(tiny["siglip"])
    with pytest.raises(EvaluatorLoadError, match="model folder .*no_such_model does not exist"):
        DinoDistance(tmp_path / "no_such_model")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        ClipScore(tiny["clip"], batch_size=0)(random_images(1), "x")


# ---------------------------------------------------------------------------------------------------
# Optional extras: LPIPS and ArcFace
# ---------------------------------------------------------------------------------------------------

def test_missing_extras_say_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)  # makes `import lpips` fail as if it were not installed
    with pytest.raises(MissingExtraError, match=r"LpipsDistance.*pip install lpips"):
        LpipsDistance()
    monkeypatch.setitem(sys.modules, "insightface", None)
    monkeypatch.setitem(sys.modules, "insightface.app", None)
    with pytest.raises(MissingExtraError, match=r"ArcFaceDistance.*pip install insightface onnxruntime"):
        ArcFaceDistance()
    with pytest.raises(ImportError):  # MissingExtraError is an ImportError for callers that catch those
        ArcFaceDistance()


def test_lpips_distance_feeds_the_package_the_right_tensors(monkeypatch):
    """A stand-in lpips package (mean squared difference) checks resizing, [-1, 1] scaling and pairing."""
    class FakeLPIPS(torch.nn.Module):
        def __init__(self, net, verbose):
            super().__init__()
            self.net = net

        def forward(self, x, y):
            return ((x - y) ** 2).mean(dim=(1, 2, 3), keepdim=True)  # (N, 1, 1, 1) like LPIPS

    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=FakeLPIPS))
    images, source = random_images(3), random_images(1, seed=5)[0]
    lpips = LpipsDistance(net="vgg", size=24, batch_size=2)
    assert lpips.model.net == "vgg"

    def by_hand(image):
        array = np.asarray(image.convert("RGB").resize((24, 24), Image.Resampling.BICUBIC), dtype=np.float64)
        return array / 127.5 - 1

    expected = torch.tensor([((by_hand(image) - by_hand(source)) ** 2).mean() for image in images])
    torch.testing.assert_close(lpips(images, source).double(), expected, atol=1e-6, rtol=0)
    assert lpips([source], source).item() == 0
    with pytest.raises(ValueError, match="net must be"):
        LpipsDistance(net="resnet")


def test_arcface_distance_uses_the_largest_face(monkeypatch):
    """A stand-in insightface: faces are read off the pixels, so the expected distance is known."""
    class Face:
        def __init__(self, bbox, embedding):
            self.bbox, self.normed_embedding = np.array(bbox, dtype=float), embedding / np.linalg.norm(embedding)

    class FakeFaceAnalysis:
        def __init__(self, name, root, providers, allowed_modules):
            self.name = name

        def prepare(self, ctx_id, det_size):
            self.ctx_id = ctx_id

        def get(self, bgr):
            if bgr.max() == 0:
                return []  # a black image has no face
            # A small face embedded from the left half, a large one from the right half (BGR order kept).
            width = bgr.shape[1]
            return [Face([0, 0, 2, 2], bgr[:, : width // 2].reshape(-1, 3).mean(0) + 1),
                    Face([0, 0, 10, 10], bgr[:, width // 2:].reshape(-1, 3).mean(0) + 1)]

    app = types.ModuleType("insightface.app")
    app.FaceAnalysis = FakeFaceAnalysis
    monkeypatch.setitem(sys.modules, "insightface", types.ModuleType("insightface"))
    monkeypatch.setitem(sys.modules, "insightface.app", app)

    def half(colour_left, colour_right):
        array = np.zeros((8, 8, 3), dtype=np.uint8)
        array[:, :4], array[:, 4:] = colour_left, colour_right
        return Image.fromarray(array)

    source = half((200, 0, 0), (10, 20, 30))
    image = half((10, 20, 30), (30, 20, 10))  # right halves differ: only the large face counts
    arcface = ArcFaceDistance()
    assert arcface.app.ctx_id == -1  # CPU
    a, b = np.array([10, 20, 30]) + 1.0, np.array([30, 20, 10]) + 1.0  # BGR means of (30,20,10) and (10,20,30)
    expected = 1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    result = arcface([image, source, half((0, 0, 0), (0, 0, 0))], source)
    assert result[0].item() == pytest.approx(expected, abs=1e-6)
    assert result[1].item() == pytest.approx(0, abs=1e-6)
    assert math.isnan(result[2].item())  # no face found: NaN, not a made-up distance


# ---------------------------------------------------------------------------------------------------
# Curves
# ---------------------------------------------------------------------------------------------------

def test_draw_curves_draws_every_case():
    panels = {"clip": {"a: curly hair": ([-1, 0, 1], [0.3, 0.2, 0.1]), "b: smile": ([1, -1, 0], [0.1, 0.2, 0.2])},
              "dino": {"a: curly hair": ([-1, 0, 1], [0.5, float("nan"), 0.5]), "b: smile": ([-1, 1], [0.0, 0.0])}}
    image = draw_curves(panels, panel_size=(300, 200))
    assert image.mode == "RGB" and image.size == (600, 200 + 10 + 2 * 20)
    colours = {colour for _, colour in image.getcolors(maxcolors=1 << 16)}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours  # the first two palette colours
    panel_two = image.crop((300, 0, 600, 200))
    assert (255, 127, 14) in {colour for _, colour in panel_two.getcolors(maxcolors=1 << 16)}  # flat curve drawn
    with pytest.raises(ValueError, match="at least one panel"):
        draw_curves({})


@pytest.mark.parametrize("scorer, hub_id", [(ClipScore, "openai/clip-vit-base-patch32"),
                                            (SiglipScore, "google/siglip-so400m-patch14-384"),
                                            (BlipItmScore, "Salesforce/blip-itm-base-coco")])
def test_default_models_are_the_releases(scorer, hub_id):
    """Offline, the default hub id cannot load, and the error names it."""
    with pytest.raises(EvaluatorLoadError, match=re.escape(hub_id)):
        scorer()


# ---------------------------------------------------------------------------------------------------
# The offline toy scorer
# ---------------------------------------------------------------------------------------------------

from slideredit.evaluation import ToyEditStrength, is_toy_model, other_instructions, read_source_scene  # noqa: E402
from slideredit.evaluation.toy import TOY_TRANSFORMER_FILE  # noqa: E402
from fake_hub import unreachable_hub  # noqa: E402, F401 (a fixture)
from slideredit.toy import shapes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def partial_edit(scene: shapes.Scene, edit: shapes.Edit, strength: float) -> shapes.Scene:
    """The scene with `edit` carried out to `strength` (0 = unchanged, 1 = the target): the ground truth."""
    before, after = scene.shape(edit.shape), edit.apply(scene).shape(edit.shape)
    if edit.attribute == "size":
        return scene.with_shape(edit.shape, size=before.size + strength * (after.size - before.size))
    color = tuple(int(round(b + strength * (a - b))) for a, b in zip(after.color, before.color))
    return scene.with_shape(edit.shape, color=tuple(min(255, max(0, c)) for c in color))


def toy_source(index: int) -> shapes.Scene:
    """A held-out source scene whose square is not red (so "make the square red" changes it)."""
    while True:
        scene = shapes.make_example(77, index, num_edits=0).source
        if shapes.nearest_color(scene.square.color) != "red":
            return scene
        index += 100


def test_read_source_scene_recovers_a_render():
    for index in range(4):
        scene = toy_source(index)
        read = read_source_scene(shapes.render_image(scene))
        for kind in shapes.SHAPES:
            truth, got = scene.shape(kind), read.shape(kind)
            assert got.color == truth.color
            assert np.allclose(got.center, truth.center, atol=0.05)
            assert abs(got.size - truth.size) < 0.3  # the readers' dead zone costs up to 0.1 px per edge
    with pytest.raises(ValueError, match="128x128"):
        read_source_scene(Image.new("RGB", (64, 64)))
    with pytest.raises(ValueError, match="no square to read"):
        read_source_scene(Image.new("RGB", (128, 128), shapes.BACKGROUND))


def test_toy_edit_strength_reads_how_far_each_edit_went():
    scorer = ToyEditStrength()
    red, larger = shapes.Edit("square", "red"), shapes.Edit("circle", "larger")
    colour = np.array([0.0, 0.25, 0.5, 0.75, 1.0])  # a colour beyond its target would clip at 0 or 255
    size = 1.5 - 2 * colour  # exaggerated (1.5) to reversed (-0.5)
    for index in range(2):
        scene = toy_source(index)
        source = shapes.render_image(scene)
        images = [shapes.render_image(partial_edit(partial_edit(scene, red, c), larger, s)) for c, s in zip(colour, size)]
        np.testing.assert_allclose(scorer(images, source, red.instruction), colour, atol=0.03)
        np.testing.assert_allclose(scorer(images, source, larger.instruction), size, atol=0.03)
        both = scorer(images, source, f"{red.instruction} and {larger.instruction}")
        np.testing.assert_allclose(both, (colour + size) / 2, atol=0.03)  # the mean of the two edits
    assert other_instructions("make the square red and make the circle larger", "make the circle larger") == [
        "make the square red"]
    assert other_instructions("make the square red", "make the square red") == []
    with pytest.raises(ValueError, match="not a toy edit"):
        scorer(images, source, "curly hair")
    with pytest.raises(ValueError, match=r"images\[0\] is 64x64"):
        scorer([Image.new("RGB", (64, 64))], source, red.instruction)


def test_a_sweep_moved_with_its_model_still_finds_it(tmp_path, monkeypatch):
    """sweep.json records a local model folder relative to the sweep folder (it held the absolute path:
    a moved or shared sweep lost its model, and eval.py picked the pretrained scorers)."""
    project = tmp_path / "project"
    (project / "toy-kontext").mkdir(parents=True)
    (project / "toy-kontext" / TOY_TRANSFORMER_FILE).write_bytes(b"")
    make_sweep_folder(project / "outputs" / "a", [(0.0,), (1.0,)], model=str(project / "toy-kontext"))
    monkeypatch.chdir(project)  # eval.py --model passes the path as typed, relative to the working folder
    make_sweep_folder(project / "outputs" / "b", [(0.0,), (1.0,)], model="toy-kontext")
    make_sweep_folder(project / "outputs" / "hub", [(0.0,), (1.0,)], model="black-forest-labs/FLUX.1-Kontext-dev")
    for name in ("a", "b"):
        text = (project / "outputs" / name / "sweep.json").read_text()
        assert json.loads(text)["model"] == "../../toy-kontext" and str(tmp_path) not in text
    assert json.loads((project / "outputs" / "hub" / "sweep.json").read_text())["model"] == \
        "black-forest-labs/FLUX.1-Kontext-dev"

    shared = tmp_path / "elsewhere" / "shared"
    shared.parent.mkdir()
    project.rename(shared)  # the project's old path is gone, as on another machine
    monkeypatch.chdir(shared.parent)
    folder = Path("shared/outputs/a")
    sweep = read_sweep(folder)
    assert sweep.model == str((shared / "toy-kontext").resolve())  # usable from the working folder
    assert is_toy_model(sweep.model, relative_to=folder)  # what eval.py --scorer auto asks
    write_sweep(folder, sweep)  # rewritten: recorded relative again
    assert json.loads((folder / "sweep.json").read_text())["model"] == "../../toy-kontext"
    assert read_sweep(shared / "outputs" / "hub").model == "black-forest-labs/FLUX.1-Kontext-dev"

    (shared / "outputs" / "a").rename(shared.parent / "a")  # moved without its model: kept as recorded
    assert read_sweep(shared.parent / "a").model == "../../toy-kontext"


def test_toy_model_is_recognised_by_its_transformer_file(tmp_path, monkeypatch):
    from slideredit.toy.models import TRANSFORMER_FILE

    assert TOY_TRANSFORMER_FILE == TRANSFORMER_FILE
    assert is_toy_model(ROOT / "assets" / "toy-kontext")
    assert not is_toy_model("black-forest-labs/FLUX.1-Kontext-dev") and not is_toy_model(tmp_path)
    (tmp_path / "sweep").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / TRANSFORMER_FILE).write_bytes(b"")
    monkeypatch.chdir(tmp_path / "sweep")
    assert not is_toy_model("model") and is_toy_model("../model") and is_toy_model("model", relative_to=tmp_path)


# ---------------------------------------------------------------------------------------------------
# An unreachable hub fails at once, in one line
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("offline", [False, True])
def test_unreachable_hub_fails_fast_in_one_line(offline, unreachable_hub, monkeypatch):
    """A refused hub is asked once, an offline one never. (The hub client's own retries, about 30 s, are
    counted in a fresh process by test_eval_script.py; here the client already read HF_HUB_OFFLINE=1 at
    import.)"""
    from slideredit.evaluation import HubUnreachableError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    for _ in range(2):  # the second load asks no more: the answer is kept for the process
        with pytest.raises(HubUnreachableError) as caught:
            ClipScore()
    assert unreachable_hub == ([] if offline else
                               ["http://127.0.0.1:9/openai/clip-vit-base-patch32/resolve/main/config.json"])
    message = str(caught.value)
    assert "\n" not in message and "'openai/clip-vit-base-patch32'" in message and "not in the local cache" in message
    assert ("HF_HUB_OFFLINE is set" if offline else "http://127.0.0.1:9 is unreachable (ConnectionRefusedError") in message
