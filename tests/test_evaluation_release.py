"""slideredit.evaluation.release: the SliderEdit release's evaluation API. Each evaluator against the release's
computation written out with transformers on tiny random-weight models (no network), the optional LPIPS and
ArcFace through stand-in packages, the utilities against hand-computed numbers, and the notebook's cells."""
from __future__ import annotations

import inspect
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from slideredit.evaluation import ArcFaceDistance, DinoDistance, EvaluatorLoadError, SiglipScore, continuity_score
from slideredit.evaluation.release import (BLIPEvaluator, CLIPEvaluator, DiNOFeatureDistanceEvaluator,
                                           FaceIdentityDistanceEvaluator, FeatureDistanceEvaluator,
                                           LPIPSFeatureDistanceEvaluator, SiglipEvaluator, VLMEvaluator, chi_square_1d,
                                           normalize_to_unit_interval)
from test_evaluation import build_tiny_models, random_images

TEXTS = ["curly hair", "a big smile", "add glasses"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_models(tmp_path_factory.mktemp("tiny_release_models"))


def rgb_images(count: int, seed: int = 0) -> list[Image.Image]:
    return [image.convert("RGB") for image in random_images(count, seed)]


# ---------------------------------------------------------------------------------------------------
# evaluation.utils: normalize_to_unit_interval, chi_square_1d
# ---------------------------------------------------------------------------------------------------

def test_normalize_to_unit_interval_by_hand():
    np.testing.assert_array_equal(normalize_to_unit_interval(np.array([2.0, 3.0, 5.0]), (1.0, 5.0)), [0.25, 0.5, 1.0])
    # The range is the caller's, not the data's: values outside it leave [0, 1]; a reversed range flips.
    np.testing.assert_array_equal(normalize_to_unit_interval([0.0, 3.0], (1.0, 5.0)), [-0.25, 0.5])
    np.testing.assert_array_equal(normalize_to_unit_interval([2.0, 3.0, 5.0], (5.0, 1.0)), [0.75, 0.5, 0.0])
    with pytest.raises(ValueError, match=r"minmax \(0.3, 0.3\) is an empty range"):
        normalize_to_unit_interval([0.3, 0.3], (0.3, 0.3))


def test_chi_square_1d_by_hand():
    # m = 4 bins of width 1/4, n = 5 points: counts (2, 0, 1, 2), n/m = 1.25:
    # chi^2 = (0.75^2 + 1.25^2 + 0.25^2 + 0.75^2) / 1.25 = 2.75 / 1.25 = 2.2, with m - 1 = 3 degrees of freedom.
    stat, dof = chi_square_1d(np.array([0.0, 0.1, 0.5, 1.0, 1.0]), m=4)
    assert stat == pytest.approx(2.2, rel=1e-12) and dof == 3
    assert isinstance(stat, np.float64) and isinstance(dof, int)
    assert (stat / dof).item() == pytest.approx(2.2 / 3, rel=1e-12)  # as the release's notebook reads it
    # A point on an inner edge counts in the bin above it; 1 counts in the last bin.
    assert chi_square_1d([0.0, 1 / 3, 2 / 3], m=3) == (0.0, 2)
    assert chi_square_1d([1.0, 1.0, 1.0], m=3) == (pytest.approx(1 + 1 + 4), 2)  # counts (0, 0, 3), n/m = 1


def test_chi_square_1d_refuses_what_it_cannot_count():
    for x01 in ([0.2, 1.2], [0.2, float("nan")], [-0.1]):
        with pytest.raises(ValueError, match=r"must be in \[0, 1\] \(use normalize_to_unit_interval\)"):
            chi_square_1d(x01, m=2)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        chi_square_1d([], m=2)
    for m in (0, 2.5, True):
        with pytest.raises(ValueError, match="m, the number of bins, must be a positive integer"):
            chi_square_1d([0.5], m=m)


# ---------------------------------------------------------------------------------------------------
# The release's constructors
# ---------------------------------------------------------------------------------------------------

RELEASE_SIGNATURES = {
    CLIPEvaluator: {"model_name": "openai/clip-vit-base-patch32", "device": "cuda"},
    SiglipEvaluator: {"model_name": "google/siglip-so400m-patch14-384", "device": "cuda"},
    BLIPEvaluator: {"model_name": "Salesforce/blip-itm-base-coco", "device": "cuda"},
    LPIPSFeatureDistanceEvaluator: {"net": inspect.Parameter.empty, "device": "cuda"},
    DiNOFeatureDistanceEvaluator: {"model_name": "facebook/dinov2-base", "device": "cuda"},
}


@pytest.mark.parametrize("evaluator", RELEASE_SIGNATURES)
def test_constructors_are_the_releases(evaluator):
    parameters = inspect.signature(evaluator).parameters
    assert {name: p.default for name, p in parameters.items()} == RELEASE_SIGNATURES[evaluator]
    base = VLMEvaluator if evaluator in (CLIPEvaluator, SiglipEvaluator, BLIPEvaluator) else FeatureDistanceEvaluator
    assert issubclass(evaluator, base)


@pytest.mark.parametrize("evaluator", [CLIPEvaluator, SiglipEvaluator, BLIPEvaluator, DiNOFeatureDistanceEvaluator])
def test_default_models_are_the_releases(evaluator):
    """Offline (tests force HF_HUB_OFFLINE), the default checkpoint cannot load, and the error names it."""
    with pytest.raises(EvaluatorLoadError, match=RELEASE_SIGNATURES[evaluator]["model_name"]):
        evaluator(device="cpu")


@pytest.mark.parametrize("build", [lambda folders: CLIPEvaluator(folders["clip"]),
                                   lambda folders: SiglipEvaluator(folders["siglip"]),
                                   lambda folders: BLIPEvaluator(folders["blip"]),
                                   lambda folders: DiNOFeatureDistanceEvaluator(folders["dino"]),
                                   lambda folders: LPIPSFeatureDistanceEvaluator(net="alex")])
def test_default_cuda_without_cuda_is_one_line(build, tiny, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=None))  # never reached
    with pytest.raises(ValueError, match="device 'cuda' is not available") as caught:
        build(tiny)
    assert "\n" not in str(caught.value)


# ---------------------------------------------------------------------------------------------------
# Text-image scores: the release's computation, written out with transformers
# ---------------------------------------------------------------------------------------------------

def release_inputs(processor, image: Image.Image, text: str) -> dict:
    """The release's processor call: one text and one image, padded to the longest text (so not at all)."""
    return dict(processor(text=text, images=image, return_tensors="pt", padding=True))


def test_clip_evaluator_is_the_releases_cosine(tiny):
    from transformers import AutoProcessor, CLIPModel

    model, processor = CLIPModel.from_pretrained(tiny["clip"]).eval(), AutoProcessor.from_pretrained(tiny["clip"])
    evaluator = CLIPEvaluator(tiny["clip"], device="cpu")
    scores = []
    for image, text in zip(rgb_images(3), TEXTS):
        with torch.no_grad():
            out = model(**release_inputs(processor, image, text))
        image_embed = F.normalize(out.image_embeds.double(), dim=-1)
        expected = (image_embed @ F.normalize(out.text_embeds.double(), dim=-1).T).item()
        score = evaluator.get_score(image, text)
        assert isinstance(score, float) and score == pytest.approx(expected, abs=1e-5)
        scores.append(score)
    assert np.std(scores) > 1e-3  # the tiny model tells the pairs apart


def test_siglip_evaluator_is_the_releases_unpadded_cosine(tiny):
    """The release reports the cosine of SigLIP's embeddings with the text unpadded, not a probability."""
    from transformers import AutoProcessor, SiglipModel

    model, processor = SiglipModel.from_pretrained(tiny["siglip"]).eval(), AutoProcessor.from_pretrained(tiny["siglip"])
    evaluator = SiglipEvaluator(tiny["siglip"], device="cpu")
    probability = SiglipScore(tiny["siglip"])
    for image, text in zip(rgb_images(3), TEXTS):
        with torch.no_grad():
            out = model(**release_inputs(processor, image, text))
            padded = processor(text=text, images=image, return_tensors="pt", padding="max_length")
            padded_out = model(input_ids=padded["input_ids"], pixel_values=padded["pixel_values"])
        expected = (out.image_embeds.double() @ out.text_embeds.double().T).item()
        score = evaluator.get_score(image, text)
        assert isinstance(score, float) and score == pytest.approx(expected, abs=1e-5)
        # Both other readings of "SigLIP score" are far from it on this model.
        assert abs(score - (padded_out.image_embeds @ padded_out.text_embeds.T).item()) > 1e-3
        assert abs(score - probability([image], text).item()) > 1e-3


def test_blip_evaluator_is_the_releases_match_probability(tiny):
    from transformers import AutoProcessor, BlipForImageTextRetrieval

    model = BlipForImageTextRetrieval.from_pretrained(tiny["blip"]).eval()
    processor = AutoProcessor.from_pretrained(tiny["blip"])
    evaluator = BLIPEvaluator(tiny["blip"], device="cpu")
    for image, text in zip(rgb_images(3), TEXTS):
        with torch.no_grad():
            logits = model(**release_inputs(processor, image, text)).itm_score.double()  # (no match, match)
        expected = (logits.exp()[0, 1] / logits.exp().sum()).item()
        score = evaluator.get_score(image, text)
        assert isinstance(score, float) and score == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------------------------------------------
# Distances
# ---------------------------------------------------------------------------------------------------

def test_dino_evaluator_is_the_releases_bfloat16_cls_distance(tiny):
    from transformers import AutoImageProcessor, Dinov2Model

    model = Dinov2Model.from_pretrained(tiny["dino"], dtype=torch.bfloat16).eval()
    processor = AutoImageProcessor.from_pretrained(tiny["dino"])

    def cls_direction(image):
        with torch.no_grad():
            pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
            return F.normalize(model(pixel_values=pixels).last_hidden_state[:, 0].double(), dim=-1)

    evaluator = DiNOFeatureDistanceEvaluator(tiny["dino"], device="cpu")
    in_float32 = DinoDistance(tiny["dino"])
    source, *images = rgb_images(3)
    for image in images:
        expected = 1 - (cls_direction(source) @ cls_direction(image).T).item()
        distance = evaluator.get_distance(source, image)
        assert isinstance(distance, float) and distance == pytest.approx(expected, abs=1e-6)
        assert abs(distance - in_float32([image], source).item()) > 1e-5  # bfloat16 is a visible choice
    assert evaluator.get_distance(source, source) == pytest.approx(0, abs=1e-6)


class FakeLPIPS(torch.nn.Module):
    """A stand-in for the lpips package's model: the mean squared difference, (N, 1, 1, 1) as LPIPS returns."""

    def __init__(self, net, verbose):
        super().__init__()
        self.net = net

    def forward(self, x, y):
        return ((x - y) ** 2).mean(dim=(1, 2, 3), keepdim=True)


def test_lpips_evaluator_compares_the_images_at_their_own_size(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=FakeLPIPS))
    rng = np.random.default_rng(4)
    image_1, image_2 = (Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)) for _ in range(2))
    evaluator = LPIPSFeatureDistanceEvaluator(net="vgg", device="cpu")
    assert evaluator.distance.model.net == "vgg"
    # The release's input: the pixels as they are, scaled to [-1, 1], no resize.
    by_hand = lambda image: np.asarray(image, dtype=np.float64) / 127.5 - 1
    expected = ((by_hand(image_1) - by_hand(image_2)) ** 2).mean()
    distance = evaluator.get_distance(image_1, image_2)
    assert isinstance(distance, float) and distance == pytest.approx(expected, abs=1e-6)
    assert evaluator.get_distance(image_1, image_1) == 0
    with pytest.raises(ValueError, match="at their own size, but they differ: 16x16, 20x12"):
        evaluator.get_distance(image_1, Image.new("RGB", (16, 16)))
    with pytest.raises(ValueError, match="net must be"):
        LPIPSFeatureDistanceEvaluator(net="resnet", device="cpu")


class Face:
    def __init__(self, bbox, embedding):
        self.bbox, self.normed_embedding = np.array(bbox, dtype=float), embedding / np.linalg.norm(embedding)


class FakeFaceAnalysis:
    """A stand-in insightface: each non-black half of an image is a face, embedded from its mean BGR colour."""
    built: list[FakeFaceAnalysis] = []

    def __init__(self, name, root, providers, allowed_modules):
        self.name, self.providers = name, providers
        FakeFaceAnalysis.built.append(self)

    def prepare(self, ctx_id, det_size):
        self.ctx_id = ctx_id

    def get(self, bgr):
        width = bgr.shape[1]
        halves = [(bgr[:, : width // 2], [0, 0, 2, 2]), (bgr[:, width // 2:], [0, 0, 10, 10])]
        return [Face(bbox, half.reshape(-1, 3).mean(0) + 1) for half, bbox in halves if half.max() > 0]


def halves(left, right) -> Image.Image:
    array = np.zeros((8, 8, 3), dtype=np.uint8)
    array[:, :4], array[:, 4:] = left, right
    return Image.fromarray(array)


def test_face_identity_needs_exactly_one_face(monkeypatch):
    app = types.ModuleType("insightface.app")
    app.FaceAnalysis = FakeFaceAnalysis
    monkeypatch.setitem(sys.modules, "insightface", types.ModuleType("insightface"))
    monkeypatch.setitem(sys.modules, "insightface.app", app)
    evaluator = FaceIdentityDistanceEvaluator()  # the release's call: no arguments
    assert isinstance(evaluator, FeatureDistanceEvaluator)
    face_app = FakeFaceAnalysis.built[-1]
    assert face_app.name == "buffalo_l" and face_app.providers[0] == "CUDAExecutionProvider" and face_app.ctx_id == 0

    black, one_face = (0, 0, 0), halves((0, 0, 0), (30, 20, 10))
    a, b = np.array([10, 20, 30]) + 1.0, np.array([30, 20, 10]) + 1.0  # BGR means of (30,20,10) and (10,20,30)
    distance = evaluator.get_distance(one_face, halves(black, (10, 20, 30)))
    assert isinstance(distance, float)
    assert distance == pytest.approx(1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), abs=1e-6)
    assert evaluator.get_distance(one_face, one_face) == pytest.approx(0, abs=1e-6)

    two_faces = halves((200, 0, 0), (30, 20, 10))
    assert ArcFaceDistance()([two_faces], one_face).item() == pytest.approx(0, abs=1e-6)  # ours: the largest face
    with pytest.warns(UserWarning, match="found 2 faces"):
        assert evaluator.get_distance(two_faces, one_face) is None  # the release: no single identity
    with pytest.warns(UserWarning, match="found 0 faces"):
        assert evaluator.get_distance(one_face, halves(black, black)) is None


# ---------------------------------------------------------------------------------------------------
# The release's notebook, with its imports changed
# ---------------------------------------------------------------------------------------------------

def test_notebook_cells_score_a_sweep(tiny, monkeypatch):
    """The notebook's scoring and continuity cells on a 6-alpha sweep (noise images), evaluators on tiny models."""
    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=FakeLPIPS))
    alpha_values = [1, 0.8, 0.5, 0, -0.5, -1]
    img, *outputs = rgb_images(1 + len(alpha_values), seed=7)
    outputs = [output.resize(img.size) for output in outputs]
    vlm_evaluators = {"CLIP": CLIPEvaluator(tiny["clip"], device="cpu"),
                      "Siglip": SiglipEvaluator(tiny["siglip"], device="cpu"),
                      "BLIP": BLIPEvaluator(tiny["blip"], device="cpu")}
    feature_distance_evaluators = {"LPIPS_alex": LPIPSFeatureDistanceEvaluator(net="alex", device="cpu"),
                                   "DiNOv2": DiNOFeatureDistanceEvaluator(tiny["dino"], device="cpu")}

    vlm_evaluator_res = {name: [] for name in vlm_evaluators}
    feature_distance_evaluator_res = {name: [] for name in feature_distance_evaluators}
    for output_image in outputs:
        for name, evaluator in vlm_evaluators.items():
            vlm_evaluator_res[name].append(evaluator.get_score(output_image, "curly hair"))
        for name, evaluator in feature_distance_evaluators.items():
            feature_distance_evaluator_res[name].append(evaluator.get_distance(img, output_image))
    assert all(len(set(values)) == len(alpha_values) for values in
               [*vlm_evaluator_res.values(), *feature_distance_evaluator_res.values()])

    for name, scores in vlm_evaluator_res.items():
        min_scores, max_scores = min(scores), max(scores)
        normalized_scores = normalize_to_unit_interval(np.array(scores), (min_scores, max_scores))
        stat, dof = chi_square_1d(normalized_scores, m=len(alpha_values))
        # The release's continuity is ours (continuity_score, reported by eval.py).
        assert (stat / dof).item() == pytest.approx(continuity_score(scores), rel=1e-12)
