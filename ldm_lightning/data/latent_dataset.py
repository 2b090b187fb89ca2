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

    Items are read from the cache's memory-mapped shards when asked for, so the dataset holds
    no latents itself and pickles small for DataLoader workers. A DataLoader fetches a batch's
    items through :meth:`__getitems__`, in one call (:meth:`LatentCache.items`).
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
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """Items ``indices`` (what ``DataLoader`` asks for per batch), for its collate."""
        flipped = None
        if self.random_flip:
            flipped = torch.randint(2, (len(indices),), generator=self.generator).bool().tolist()
        latents, labels, captions = self.cache.items(indices, flipped)
        return [{"latent": z, "label": label, "caption": caption}
                for z, label, caption in zip(latents.float().unbind(0), labels, captions,
                                             strict=True)]
