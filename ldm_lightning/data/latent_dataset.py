"""The training items of a latent cache: one latent (or its flipped twin), label, caption."""

from __future__ import annotations

from typing import Any

import torch

from ldm_lightning.data.interface import CaptionedDataset
from ldm_lightning.data.latent_cache import LatentCache


class LatentDataset(CaptionedDataset):
    """Items of a :class:`LatentCache`: ``{"latent": [C, h, w] float32, "label", "caption"}``.

    With ``random_flip`` each item returns ``E(x)`` or ``E(flip(x))`` with probability 1/2,
    both encoded from pixels by :func:`encode_dataset`. Flipping the latent itself would be
    wrong: the encoder is not exactly flip-equivariant and a VQ code not at all, so
    ``flip(E(x))`` is generally not a latent the decoder maps to ``flip(x)``.
    """

    def __init__(self, cache: LatentCache, random_flip: bool = False,
                 generator: torch.Generator | None = None) -> None:
        if random_flip and cache.latents_flipped is None:
            raise ValueError(
                f"random_flip=True needs flipped latents, but {cache.path} was built with "
                "key.flip=False; rebuild with CacheKey(..., flip=True) or set random_flip=False"
            )
        self.cache = cache
        self.random_flip = random_flip
        self.generator = generator
        # Python ints and strs per item, so __getitem__ only indexes.
        self._labels = cache.labels.tolist()

    def __len__(self) -> int:
        return len(self.cache)

    def captions(self) -> list[str]:
        return list(self.cache.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        source = self.cache.latents
        if self.random_flip and torch.randint(2, (), generator=self.generator).item():
            source = self.cache.latents_flipped
        return {"latent": source[index].float(), "label": self._labels[index],
                "caption": self.cache.captions[index]}
