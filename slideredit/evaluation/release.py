"""The SliderEdit release's evaluation API (its `evaluation` package), over this project's evaluators.

The release's evaluation notebook runs with its imports changed to

    from slideredit.evaluation.release import (CLIPEvaluator, SiglipEvaluator, BLIPEvaluator,
        LPIPSFeatureDistanceEvaluator, DiNOFeatureDistanceEvaluator, FaceIdentityDistanceEvaluator,
        normalize_to_unit_interval, chi_square_1d)

The constructors are the release's (`model_name` = its hub checkpoint, `device="cuda"`), each call takes
one image, and the numbers are the release's:

- CLIP: cosine of the projected embeddings (ClipScore). BLIP: the ITM match probability (BlipItmScore).
- SigLIP: the cosine of SigLIP's normalised embeddings with the text not padded, which is what the
  release reports; SiglipScore's match probability is sigmoid(cosine * scale + bias) of the text
  padded to 64 tokens, as SigLIP was trained.
- LPIPS (optional `lpips` package): the two images at their own size, not resized (LpipsDistance).
- DINOv2: 1 - cosine of the CLS tokens of the model in bfloat16, as the release loads it (DinoDistance).
- Face identity (optional `insightface` package): ArcFace as ArcFaceDistance, but only an image with
  exactly one face has an identity; otherwise the distance is None, with a warning, as in the release.

A model loads when its evaluator is built (a hub id or a local folder, as our evaluators take them);
nothing is loaded, and no optional package is imported, at import.
"""
from __future__ import annotations

import math
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .continuity import uniformity_chi_square, unit_interval
from .distances import ArcFaceDistance, DinoDistance, LpipsDistance
from .scores import BlipItmScore, ClipScore, SiglipScore, TextImageScore


def _device(device: str | torch.device) -> str | torch.device:
    """The release's default "cuda" on a machine without CUDA is a one-line error, not a deep traceback."""
    from slideredit.pipelines import check_device  # imported when an evaluator is built: it loads the pipeline

    check_device(device)
    return device


class VLMEvaluator(ABC):
    """The release's base class of the text-image scores."""

    @abstractmethod
    def get_score(self, image: Image.Image, text: str) -> float:
        """How strongly `image` shows `text` (e.g. "curly hair")."""


class FeatureDistanceEvaluator(ABC):
    """The release's base class of the distances between two images."""

    @abstractmethod
    def get_distance(self, image_1: Image.Image, image_2: Image.Image) -> float | None:
        """How far apart the two images are; 0 for identical images."""


class _TextImageEvaluator(VLMEvaluator):
    """A release evaluator over one of our scorers, which score lists of images."""

    def __init__(self, scorer: TextImageScore):
        self.scorer = scorer

    def get_score(self, image: Image.Image, text: str) -> float:
        return float(self.scorer([image], text)[0])


class CLIPEvaluator(_TextImageEvaluator):
    """Cosine similarity of CLIP's projected image and text embeddings, in [-1, 1]."""

    def __init__(self, model_name: str | os.PathLike = ClipScore.default_model, device: str | torch.device = "cuda"):
        super().__init__(ClipScore(model_name, device=_device(device)))


class _UnpaddedSiglipCosine(SiglipScore):
    """The release's SigLIP number: the cosine of SigLIP's normalised image and text embeddings.

    The release's processor call pads to the longest text, so one text is not padded at all; built
    with batch_size=1, every text here is scored alone, hence unpadded too. (No attention mask is
    passed: for one unpadded text it would be all ones.)
    """

    def _score(self, images: list[Image.Image], texts: list[str]) -> torch.Tensor:
        inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=True, truncation=True)
        out = self.model(input_ids=inputs["input_ids"].to(self.device),
                         pixel_values=inputs["pixel_values"].to(self.device, self.dtype))
        return F.cosine_similarity(out.image_embeds.float(), out.text_embeds.float(), dim=-1)


class SiglipEvaluator(_TextImageEvaluator):
    """Cosine similarity of SigLIP's image and text embeddings, in [-1, 1] (not SiglipScore's probability)."""

    def __init__(self, model_name: str | os.PathLike = SiglipScore.default_model,
                 device: str | torch.device = "cuda"):
        super().__init__(_UnpaddedSiglipCosine(model_name, device=_device(device), batch_size=1))


class BLIPEvaluator(_TextImageEvaluator):
    """BLIP's image-text matching probability, in [0, 1]."""

    def __init__(self, model_name: str | os.PathLike = BlipItmScore.default_model,
                 device: str | torch.device = "cuda"):
        super().__init__(BlipItmScore(model_name, device=_device(device)))


class _PairDistanceEvaluator(FeatureDistanceEvaluator):
    """A release evaluator over one of our distances, which compare lists of images with their sources."""

    def __init__(self, distance: DinoDistance | LpipsDistance | ArcFaceDistance):
        self.distance = distance

    def get_distance(self, image_1: Image.Image, image_2: Image.Image) -> float | None:
        distance = float(self.distance([image_1], [image_2])[0])
        return None if math.isnan(distance) else distance  # NaN: no identity to compare (the release's None)


class LPIPSFeatureDistanceEvaluator(_PairDistanceEvaluator):
    """LPIPS over AlexNet ("alex") or VGG ("vgg") features, the images at their own (equal) size."""

    def __init__(self, net: str, device: str | torch.device = "cuda"):
        super().__init__(LpipsDistance(net=net, device=_device(device), size=None))


class DiNOFeatureDistanceEvaluator(_PairDistanceEvaluator):
    """1 - cosine similarity of DINOv2's CLS tokens, the model in bfloat16 as the release loads it."""

    def __init__(self, model_name: str | os.PathLike = "facebook/dinov2-base", device: str | torch.device = "cuda"):
        super().__init__(DinoDistance(model_name, device=_device(device), dtype=torch.bfloat16))


class _SingleFaceArcFace(ArcFaceDistance):
    """ArcFaceDistance with the release's rule: an image has an identity only when exactly one face is found."""

    def _embed(self, image: Image.Image) -> np.ndarray | None:
        faces = self._faces(image)
        if len(faces) != 1:
            warnings.warn(f"found {len(faces)} faces in an image; the face identity distance needs exactly one, "
                          "so it is None", stacklevel=2)
            return None
        return np.asarray(faces[0].normed_embedding, dtype=np.float64)


class FaceIdentityDistanceEvaluator(_PairDistanceEvaluator):
    """1 - cosine similarity of ArcFace identities (insightface's buffalo_l); None unless each image has one face.

    The release's constructor takes no arguments and asks onnxruntime for CUDA, falling back to the CPU:
    the default device="cuda" does the same.
    """

    def __init__(self, device: str | torch.device = "cuda"):
        super().__init__(_SingleFaceArcFace(device=device))


def normalize_to_unit_interval(x: Sequence[float] | np.ndarray, minmax: tuple[float, float]) -> np.ndarray:
    """(x - min) / (max - min) for minmax = (min, max): min -> 0, max -> 1, as a float64 array."""
    low, high = minmax
    if high == low:
        raise ValueError(f"normalize_to_unit_interval: minmax {tuple(minmax)} is an empty range (all scores equal?); "
                         "max must differ from min")
    return unit_interval(np.asarray(x, dtype=np.float64), low, high)


def chi_square_1d(x01: Sequence[float] | np.ndarray, m: int) -> tuple[np.float64, int]:
    """The release's chi^2 uniformity test of values in [0, 1] over m equal bins: (statistic, m - 1 dof).

    statistic = sum (count - n/m)^2 / (n/m); the release's continuity score is statistic / dof with
    m = n, the number of alphas (continuity_score). The statistic is a NumPy float, as the release's
    notebook calls `(stat / dof).item()`.
    """
    values = np.asarray(x01, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"chi_square_1d: x01 must be a non-empty 1-D sequence of numbers, got shape {values.shape}")
    if not np.all((values >= 0) & (values <= 1)):  # NaN fails too
        raise ValueError("chi_square_1d: every point of x01 must be in [0, 1] (use normalize_to_unit_interval), "
                         f"got {values.tolist()}")
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
        raise ValueError(f"chi_square_1d: m, the number of bins, must be a positive integer, got {m!r}")
    return np.float64(uniformity_chi_square(values, bins=int(m))), int(m) - 1
