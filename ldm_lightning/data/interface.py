"""The data side of the one data<->model handshake (``ldm_lightning.models.handshake.connect``).

A model hands the datamodule a :class:`LatentEncoder` (what the latent cache encodes with, and
the key it is stored under); the datamodule offers models a :class:`DataSource` (batch size,
labels, class names, captions per split, latent statistics). Neither reaches into the other
through the trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor, nn
from torch.utils.data import Dataset

from ldm_lightning.diffusion.latent_norm import LatentStats


@dataclass(frozen=True)
class LatentEncoder:
    """How a model's frozen first stage encodes images for the latent cache.

    Attributes:
        encode: images ``[B, 3, H, W]`` in [-1, 1] -> unnormalised latents ``[B, C, h, w]``.
        cache_key: identity of the encoder's weights; cached latents are keyed on it.
        module: the encoder's module, moved to the device that encodes.
    """

    encode: Callable[[Tensor], Tensor]
    cache_key: str
    module: nn.Module


class CaptionedDataset(Dataset):
    """A dataset of ``{"image" | "latent", "label", "caption"}`` items that can list its captions
    without decoding any image (a tokenizer is learned from them)."""

    def captions(self) -> list[str]:  # pragma: no cover - every subclass implements it
        """The caption of every item, in item order."""
        raise NotImplementedError


class DataSource(Protocol):
    """What a model may ask of the data it trains on."""

    batch_size: int

    @property
    def num_classes(self) -> int:
        """Number of integer labels (0: unlabelled)."""

    @property
    def class_names(self) -> list[str] | None:
        """The name of each label in label order, None when the labels have no names."""

    def captions(self, split: str) -> list[str]:
        """Every caption of ``split``, in item order."""

    def latent_stats(self, num_batches: int) -> LatentStats:
        """Per-channel statistics of the unnormalised latents of the first ``num_batches``
        training batches (from the latent cache, or encoded by the connected encoder)."""
