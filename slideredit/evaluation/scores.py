"""Text-image scores: how strongly an image shows an attribute phrase such as "curly hair".

Each evaluator is called as `scorer(images, texts) -> (N,)` float32 tensor, image i scored against
text i (one text is used for every image). Images are processed `batch_size` at a time; the model is
loaded once, from a hub id or a local folder holding the model and its processor files.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from .loading import batched, broadcast, check_images, load_model


class TextImageScore:
    """Shared by the scorers: load `model_class` and its processor once, score in batches."""
    model_class = ""  # a transformers class name
    model_types: tuple[str, ...] = ()
    default_model = ""  # the release's checkpoint on the hub

    def __init__(self, model: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 16, dtype: torch.dtype = torch.float32):
        import transformers

        model = model or self.default_model
        self.model, self.processor = load_model(getattr(transformers, self.model_class), transformers.AutoProcessor,
                                                model, self.model_types, device, dtype)
        self.device, self.dtype, self.batch_size = device, dtype, batch_size

    def __call__(self, images: Sequence[Image.Image], texts: str | Sequence[str]) -> torch.Tensor:
        images = check_images(images)
        return batched(self._score, self.batch_size, images, broadcast(texts, len(images), "texts", str))

    def _score(self, images: list[Image.Image], texts: list[str]) -> torch.Tensor:
        raise NotImplementedError


class ClipScore(TextImageScore):
    """Cosine similarity of CLIP's projected image and text embeddings, in [-1, 1] (release: ViT-B/32)."""
    model_class, model_types = "CLIPModel", ("clip",)
    default_model = "openai/clip-vit-base-patch32"

    def _score(self, images: list[Image.Image], texts: list[str]) -> torch.Tensor:
        inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=True, truncation=True)
        out = self.model(input_ids=inputs["input_ids"].to(self.device),
                         attention_mask=inputs["attention_mask"].to(self.device),
                         pixel_values=inputs["pixel_values"].to(self.device, self.dtype))
        return F.cosine_similarity(out.image_embeds.float(), out.text_embeds.float(), dim=-1)


class SiglipScore(TextImageScore):
    """SigLIP's probability that image and text match: sigmoid(cos * exp(logit_scale) + logit_bias), in [0, 1].

    This is the "SigLIP score" here: SigLIP is trained with a per-pair sigmoid loss, so the sigmoid of
    its logit is a calibrated match probability for one (image, text) pair, unlike CLIP's softmax over
    a batch. Text is padded to the tokenizer's max length (64) and no attention mask is passed, which
    is how SigLIP was trained (its text tower pools the last position; the pad token is EOS).
    """
    model_class, model_types = "SiglipModel", ("siglip",)
    default_model = "google/siglip-so400m-patch14-384"

    def _score(self, images: list[Image.Image], texts: list[str]) -> torch.Tensor:
        inputs = self.processor(images=images, text=texts, return_tensors="pt", padding="max_length", truncation=True)
        out = self.model(input_ids=inputs["input_ids"].to(self.device),
                         pixel_values=inputs["pixel_values"].to(self.device, self.dtype))
        return out.logits_per_image.diagonal().float().sigmoid()  # (images, texts) logits: pair i is [i, i]


class BlipItmScore(TextImageScore):
    """BLIP's image-text matching probability: softmax of the ITM head's (no match, match) logits, [:, 1]."""
    model_class, model_types = "BlipForImageTextRetrieval", ("blip",)
    default_model = "Salesforce/blip-itm-base-coco"

    def _score(self, images: list[Image.Image], texts: list[str]) -> torch.Tensor:
        inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=True, truncation=True)
        out = self.model(input_ids=inputs["input_ids"].to(self.device),
                         attention_mask=inputs["attention_mask"].to(self.device),
                         pixel_values=inputs["pixel_values"].to(self.device, self.dtype), use_itm_head=True)
        return out.itm_score.float().softmax(dim=-1)[:, 1]
