"""The frozen encoders of training: the VAE (source images) and T5 + CLIP (prompts).

They run once per micro-batch, before the transformer, under no_grad. Two ways to keep them out of the
transformer's memory:
- `offload`: the text encoders and the VAE live on the CPU and visit the GPU only while they encode;
- a cache folder: each source latent and each prompt's embeddings are stored once as safetensors,
  keyed by a hash of (content, model, resolution or sequence length, dtype); later epochs and later
  runs read them back, and a cached image is not even decoded.
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..atomic import atomic_path
from ..pipelines import SliderEditFluxKontextPipeline
from ..sampling import pack_latents


class EncodingCache:
    """`folder/<kind>/<2 hex>/<sha256>.safetensors`, one small file per item, written atomically."""

    def __init__(self, folder: str | Path, model_key: str):
        self.folder, self.model_key = Path(folder).expanduser(), model_key

    def key(self, kind: str, content: bytes, setting: str) -> str:
        digest = hashlib.sha256(f"{kind}|{self.model_key}|{setting}|".encode())
        digest.update(content)
        return digest.hexdigest()

    def path(self, kind: str, key: str) -> Path:
        return self.folder / kind / key[:2] / f"{key}.safetensors"

    def load(self, kind: str, key: str) -> dict[str, Tensor] | None:
        path = self.path(kind, key)
        return load_file(path) if path.is_file() else None

    def save(self, kind: str, key: str, tensors: dict[str, Tensor]) -> None:
        with atomic_path(self.path(kind, key)) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)


@dataclass
class Source:
    """One source image on its way to a latent: cached already, or decoded pixels to encode."""
    key: str | None  # cache key (None without a cache)
    latent: Tensor | None = None  # (N, 64) packed
    pixels: Tensor | None = None  # (3, H, W) in [-1, 1]


@contextmanager
def visiting(module: nn.Module, device: torch.device, offloaded: bool):
    """Bring an offloaded module to `device` for the block and send it back to the CPU afterwards."""
    if not offloaded:
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to("cpu")


class FrozenEncoders:
    def __init__(self, pipe: SliderEditFluxKontextPipeline, resolution: int, cache: EncodingCache | None,
                 offload: bool):
        self.pipe, self.resolution, self.cache, self.offload = pipe, resolution, cache, offload
        self.max_length = pipe.defaults.max_sequence_length
        if offload:
            pipe.autoencoder.to("cpu")  # the pipeline offloads the text encoders itself

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    def autoencoder_on_device(self):
        return visiting(self.pipe.autoencoder, self.device, self.offload)

    # --- images ---------------------------------------------------------------------------------------

    def image_key(self, raw: bytes) -> str | None:
        if self.cache is None:
            return None
        return self.cache.key("latents", raw, f"{self.resolution}px|{self.pipe.dtype}")

    def cached_latent(self, key: str | None) -> Tensor | None:
        stored = self.cache.load("latents", key) if key is not None else None
        return None if stored is None else stored["latent"]

    @torch.no_grad()
    def latents(self, sources: list[Source]) -> Tensor:
        """(b, N, 64) packed latents in the model's dtype; the uncached sources are encoded in one VAE call
        (and stored)."""
        todo = [s for s in sources if s.latent is None]
        if todo:
            with self.autoencoder_on_device() as vae:
                pixels = torch.stack([s.pixels for s in todo]).to(self.device, self.pipe.dtype)
                encoded = pack_latents(vae.encode(pixels))
            for source, latent in zip(todo, encoded):
                source.latent, source.pixels = latent, None
                if source.key is not None:
                    self.cache.save("latents", source.key, {"latent": latent})
        # cached latents come from the CPU, fresh ones are on the device already
        return torch.stack([s.latent.to(self.device, self.pipe.dtype) for s in sources])

    # --- prompts --------------------------------------------------------------------------------------

    @torch.no_grad()
    def prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """-> (T5 (P, T, C), CLIP pooled (P, D)) for the prompts in order. Each distinct prompt is encoded
        once (GSTLoRA's neutral teacher prompt repeats in every row), the uncached ones in ONE call."""
        unique = list(dict.fromkeys(prompts))
        found: dict[str, tuple[Tensor, Tensor]] = {}
        keys = {}
        if self.cache is not None:
            for p in unique:
                keys[p] = self.cache.key("prompts", p.encode(), f"{self.max_length}tok|{self.pipe.dtype}")
                stored = self.cache.load("prompts", keys[p])
                if stored is not None:
                    found[p] = (stored["t5"], stored["pooled"])
        todo = [p for p in unique if p not in found]
        if todo:
            t5, pooled = self.pipe.encode_prompt(todo, self.max_length)
            for p, t, v in zip(todo, t5, pooled):
                found[p] = (t, v)
                if self.cache is not None:
                    self.cache.save("prompts", keys[p], {"t5": t, "pooled": v})
        on_device = {p: (t.to(self.device, self.pipe.dtype), v.to(self.device, self.pipe.dtype))
                     for p, (t, v) in found.items()}  # cached ones come from the CPU
        return torch.stack([on_device[p][0] for p in prompts]), torch.stack([on_device[p][1] for p in prompts])

    def t5_token_ids(self, prompt: str) -> list[int]:
        """The T5 tokenizer alone (STLoRA's span search): no encoder runs."""
        return self.pipe.text_encoders.t5_token_ids(prompt)
