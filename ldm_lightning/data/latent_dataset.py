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

    Items are read from the cache's memory-mapped shards one at a time, so the dataset holds
    no latents itself and pickles small for DataLoader workers. A float32 item is a view of the
    mapping (the collate copies it into the batch); the mapping is private, so writing into an
    item changes that process's copy of the page, never the file.
    """

    def __init__(self, cache: LatentCache, random_flip: bool = False,
                 generator: torch.Generator | None = None) -> None:
        if random_flip and not cache.has_flipped:
            raise ValueError(
                f"random_flip=True needs flipped latents, but {cache.path} was built with "
                "key.flip=False; rebuild with CacheKey(..., flip=True) or set random_flip=False"
            )
        self.cache = cache
        self.random_flip = random_flip
        self.generator = generator

    def __len__(self) -> int:
        return len(self.cache)

    def captions(self) -> list[str]:
        return self.cache.captions()

    def __getitem__(self, index: int) -> dict[str, Any]:
        flipped = self.random_flip and bool(torch.randint(2, (), generator=self.generator).item())
        latent, label, caption = self.cache.item(index, flipped)
        return {"latent": latent.float(), "label": label, "caption": caption}
