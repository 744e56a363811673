"""Distances of edited images to their source image: how much an edit changed the picture.

Each evaluator is called as `distance(images, sources) -> (N,)` float32 tensor, image i against
source i (one source image is used for every image). 0 means identical. DINOv2 runs through
transformers; LPIPS and ArcFace need optional packages that are imported only when the evaluator is
built, with a message saying what to install when they are missing.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .loading import batched, broadcast, check_images, import_extra, load_model


def _sources(sources: Image.Image | Sequence[Image.Image], count: int) -> list[Image.Image]:
    return check_images(broadcast(sources, count, "sources", Image.Image), "sources")


class DinoDistance:
    """1 - cosine similarity of DINOv2's CLS tokens (the final layer-normed token 0), in [0, 2]."""

    def __init__(self, model: str | os.PathLike = "facebook/dinov2-base", device: str | torch.device = "cpu",
                 batch_size: int = 16, dtype: torch.dtype = torch.float32):
        from transformers import AutoImageProcessor, Dinov2Model

        self.model, self.processor = load_model(Dinov2Model, AutoImageProcessor, model, ("dinov2",), device, dtype)
        self.device, self.dtype, self.batch_size = device, dtype, batch_size

    def __call__(self, images: Sequence[Image.Image], sources: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
        images = check_images(images)
        if isinstance(sources, Image.Image):  # the usual case, one source for a whole sweep: embed it once
            source_embeds = batched(self._embed, self.batch_size, check_images([sources], "sources"))
        else:
            source_embeds = batched(self._embed, self.batch_size, _sources(sources, len(images)))
        image_embeds = batched(self._embed, self.batch_size, images)
        return (1 - F.cosine_similarity(image_embeds, source_embeds, dim=-1)).clamp(0, 2)

    def _embed(self, images: list[Image.Image]) -> torch.Tensor:
        pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return self.model(pixel_values=pixel_values.to(self.device, self.dtype)).last_hidden_state[:, 0]


class LpipsDistance:
    """LPIPS perceptual distance (the `lpips` package's learned weights over AlexNet or VGG features).

    LPIPS compares equally sized images: every image and source is resized to size x size (bicubic),
    which also makes distances comparable between sweeps of different resolutions. size=None compares
    them at their own size, as the release's evaluator does; they must then all have one size.
    """

    def __init__(self, net: str = "alex", device: str | torch.device = "cpu", batch_size: int = 16,
                 size: int | None = 512):
        if net not in ("alex", "vgg", "squeeze"):
            raise ValueError(f"LpipsDistance: net must be 'alex', 'vgg' or 'squeeze', got {net!r}")
        lpips = import_extra("lpips", "LpipsDistance (metric 'lpips')", "lpips")
        self.model = lpips.LPIPS(net=net, verbose=False).to(device).eval()
        self.device, self.batch_size, self.size = device, batch_size, size

    def __call__(self, images: Sequence[Image.Image], sources: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
        images = check_images(images)
        sources = _sources(sources, len(images))
        sizes = sorted({image.size for image in images + sources})
        if self.size is None and len(sizes) > 1:
            raise ValueError("LpipsDistance(size=None) compares images at their own size, but they differ: "
                             f"{', '.join(f'{width}x{height}' for width, height in sizes)}; give size= to resize them")
        return batched(self._distance, self.batch_size, images, sources)

    def _to_tensor(self, images: list[Image.Image]) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1], the range LPIPS expects; H = W = size unless size is None."""
        if self.size is not None:
            images = [image.resize((self.size, self.size), Image.Resampling.BICUBIC) for image in images]
        pixels = torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2).float()
        return (pixels / 127.5 - 1).to(self.device)

    def _distance(self, images: list[Image.Image], sources: list[Image.Image]) -> torch.Tensor:
        return self.model(self._to_tensor(images), self._to_tensor(sources)).flatten()  # (N, 1, 1, 1) -> (N,)


class ArcFaceDistance:
    """1 - cosine similarity of ArcFace identity embeddings (insightface), in [0, 2]; for face images only.

    insightface detects the faces; the largest face of each image is embedded. An image in which no
    face is found gets NaN (not a number is more honest than a made-up distance). The model pack
    (default buffalo_l, whose recognition model is an ArcFace ResNet-50) is fetched by insightface into
    `root` on first use.
    """

    def __init__(self, model_pack: str = "buffalo_l", device: str | torch.device = "cpu", det_size: int = 640,
                 root: str | os.PathLike = "~/.insightface"):
        face_app = import_extra("insightface.app", "ArcFaceDistance (metric 'arcface')", "insightface onnxruntime")
        on_gpu = str(device).startswith("cuda")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if on_gpu else ["CPUExecutionProvider"]
        self.app = face_app.FaceAnalysis(name=model_pack, root=str(root), providers=providers,
                                         allowed_modules=["detection", "recognition"])
        self.app.prepare(ctx_id=0 if on_gpu else -1, det_size=(det_size, det_size))

    def __call__(self, images: Sequence[Image.Image], sources: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
        images = check_images(images)
        if isinstance(sources, Image.Image):  # one source for a whole sweep: detect its face once
            source_embeddings = [self._embed(check_images([sources], "sources")[0])] * len(images)
        else:
            source_embeddings = [self._embed(source) for source in _sources(sources, len(images))]
        distances = []
        for image, b in zip(images, source_embeddings):
            a = self._embed(image)
            if a is None or b is None:
                distances.append(float("nan"))
            else:
                distances.append(1 - float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))))
        return torch.tensor(distances, dtype=torch.float32).clamp(0, 2)

    def _faces(self, image: Image.Image) -> list:
        """The faces insightface detects in `image` (it wants BGR pixels)."""
        return self.app.get(np.ascontiguousarray(np.asarray(image)[:, :, ::-1]))

    def _embed(self, image: Image.Image) -> np.ndarray | None:
        faces = self._faces(image)
        if not faces:
            return None
        largest = max(faces, key=lambda face: (face.bbox[2] - face.bbox[0]) * (face.bbox[3] - face.bbox[1]))
        return np.asarray(largest.normed_embedding, dtype=np.float64)
