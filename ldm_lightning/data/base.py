"""Shared LightningDataModule for image datasets.

Every dataset in this package yields samples as dicts::

    {"image": FloatTensor [3, H, W] in [-1, 1], "label": int, "caption": str}

so every stage (autoencoder, conditioner, diffusion) reads any dataset the same way. With
``cache_latents=True`` and a model that handed over its first stage
(:meth:`ImageDataModule.use_latent_encoder`, done by ``ldm_lightning.models.connect``), each
split is encoded once and served from the on-disk latent cache instead, as
``{"latent": FloatTensor [C, h, w], "label": int, "caption": str}``.

The datamodule is the models' :class:`~ldm_lightning.data.interface.DataSource`: batch size,
labels, class names, captions per split and latent statistics.
"""

from __future__ import annotations

import itertools
import os
from functools import cached_property
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ldm_lightning.data.interface import CaptionedDataset, LatentEncoder
from ldm_lightning.data.latent_cache import CacheKey, build_latent_cache
from ldm_lightning.data.latent_dataset import LatentDataset
from ldm_lightning.diffusion.latent_norm import LatentStats

SPLITS = ("train", "val", "test")
_JSON_SCALARS = (int, float, str, bool, type(None))


def json_value(value: Any) -> Any:
    """``value`` in JSON types: paths as resolved strings, tuples as lists, dict keys as
    strings. Raises ``TypeError`` for anything else (objects, tensors)."""
    if isinstance(value, os.PathLike):
        return str(Path(value).resolve())
    if isinstance(value, _JSON_SCALARS):
        return value
    if isinstance(value, (list, tuple)):
        return [json_value(item) for item in value]
    if isinstance(value, dict):
        return {str(key): json_value(item) for key, item in value.items()}
    raise TypeError(f"{type(value).__name__} is not a plain setting")


class ImageDataModule(pl.LightningDataModule):
    """Batches, workers and loaders shared by all image datamodules.

    Subclasses implement :meth:`build_split` (one ``Dataset`` per split) and may override
    :meth:`prepare_data` (download, once per node).
    """

    def __init__(
        self,
        image_size: int = 32,
        batch_size: int = 16,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        drop_last: bool = True,
        cache_latents: bool = False,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if image_size <= 0:
            raise ValueError(f"data.image_size must be positive, got {image_size}")
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.drop_last = drop_last
        if cache_latents and not cache_dir:
            raise ValueError(
                "data.cache_latents=true needs data.cache_dir (e.g. ${paths.cache_dir})"
            )
        self.cache_latents = cache_latents
        self.cache_dir = cache_dir
        self.datasets: dict[str, Dataset] = {}
        self._encoder: LatentEncoder | None = None

    def use_latent_encoder(self, encoder: LatentEncoder | None) -> None:
        """The model's side of the handshake: what the latent cache encodes with (None: the
        model has no first stage). Call before the splits are built."""
        if self.cache_latents and self.datasets and encoder is not self._encoder:
            raise RuntimeError(
                "the datamodule's splits are built already; hand over the encoder first "
                "(ldm_lightning.models.connect(model, datamodule) before trainer.fit)"
            )
        self._encoder = encoder

    @property
    def name(self) -> str:
        """Short dataset name used in cache file names and run tags."""
        return type(self).__name__.removesuffix("DataModule").lower()

    def transform_signature(self) -> dict[str, Any]:
        """Every plain setting that determines the pixels, as JSON values; the latent cache
        (and the FID cache) keys on it.

        Collected from the instance's public attributes, so a new option in a subclass changes
        the key without anyone remembering to add it here. Paths become resolved strings (two
        folders of the same name in different places are different data). Left out: loader
        settings (batch size, workers), which do not change pixels; values a ``cached_property``
        stored (file lists, class names: derived from the settings, and present or not
        depending on what was read before); and attributes that are not plain data.
        """
        skip = {
            "batch_size",
            "num_workers",
            "pin_memory",
            "persistent_workers",
            "drop_last",
            "datasets",
            "cache_latents",
            "cache_dir",
            *vars(pl.LightningDataModule()),
        }
        fields = {}
        for name, value in vars(self).items():
            derived = isinstance(getattr(type(self), name, None), cached_property)
            if name.startswith("_") or name in skip or derived:
                continue
            try:
                fields[name] = json_value(value)
            except TypeError:
                continue
        return {"datamodule": type(self).__qualname__, **fields}

    @property
    def num_classes(self) -> int:
        """Number of integer labels (0 when the dataset is unlabelled)."""
        return 0

    @property
    def class_names(self) -> list[str] | None:
        """The name of each label in label order; None when the labels have no names."""
        return None

    def captions(self, split: str) -> list[str]:
        """Every caption of ``split`` in item order, read without decoding images."""
        dataset = self.dataset(split)
        if not isinstance(dataset, CaptionedDataset):
            raise TypeError(
                f"{type(self).__name__}.build_split returned a {type(dataset).__name__}; "
                "datasets must subclass ldm_lightning.data.interface.CaptionedDataset"
            )
        return dataset.captions()

    def latent_stats(self, num_batches: int) -> LatentStats:
        """Statistics of the unnormalised latents of the first ``num_batches`` training batches:
        the cached latents, or the images encoded by the handed-over encoder."""
        encoder = self._encoder
        if encoder is None:
            raise RuntimeError(
                "latent statistics need the model's encoder: call "
                "ldm_lightning.models.connect(model, datamodule) first"
            )
        device = next(encoder.module.parameters(), torch.empty(0)).device

        def latents(batch: dict[str, Any]) -> torch.Tensor:
            if "latent" in batch:
                return batch["latent"].float()
            with torch.no_grad():
                return encoder.encode(batch["image"].to(device)).float()

        batches = itertools.islice(self.train_dataloader(), num_batches)
        return LatentStats.of(latents(batch) for batch in batches)

    def build_split(self, split: str, augment: bool | None = None) -> Dataset:  # pragma: no cover
        """The dataset of ``split``; ``augment`` (default: train only): random crops, flips."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        use_cache = self.cache_latents and self._encoder is not None and self.trainer is not None
        if self.cache_latents and self.trainer is not None and not use_cache:
            raise ValueError(
                "data.cache_latents=true, but no model handed over a first stage to encode "
                "with: the model has none (set data.cache_latents=false for it), or "
                "ldm_lightning.models.connect(model, datamodule) was not called before "
                "trainer.fit (python -m ldm_lightning.train calls it)."
            )
        for split in SPLITS:
            if split not in self.datasets:
                self.datasets[split] = self._cached(split) if use_cache else self.build_split(split)

    def _cached(self, split: str) -> Dataset:
        """Latents of ``split`` from the cache, encoded once by the handed-over encoder.

        The cache stores un-augmented images (centre crops) and, where the split flips at
        random, the latents of the mirrored images too; the dataset picks one of the two.
        """
        flip = split == "train" and bool(getattr(self, "flip", False))
        encoder = self._encoder
        key = CacheKey(
            autoencoder_hash=encoder.cache_key,
            dataset=self.name,
            split=split,
            transforms=self.transform_signature(),
            flip=flip,
        )
        strategy = self.trainer.strategy
        device = strategy.root_device
        encoder.module.to(device)

        def build(rank: int):
            return build_latent_cache(
                encoder.encode,
                self.build_split(split, augment=False),
                self.cache_dir,
                key,
                batch_size=self.batch_size,
                num_workers=self.num_workers,
                device=device,
                rank=rank,
                world_size=self.trainer.world_size,
            )

        rank = self.trainer.global_rank
        cache = build(0) if rank == 0 else None
        strategy.barrier("latent_cache")
        if cache is None:
            cache = build(rank)
        return LatentDataset(cache, random_flip=flip)

    def dataset(self, split: str) -> Dataset:
        self.setup()
        return self.datasets[split]

    def loader(self, split: str, shuffle: bool | None = None, **overrides: Any) -> DataLoader:
        """A DataLoader over ``split``; training shuffles and drops the last partial batch."""
        train = split == "train"
        kwargs: dict[str, Any] = {
            "batch_size": self.batch_size,
            "shuffle": train if shuffle is None else shuffle,
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.persistent_workers,
            "drop_last": self.drop_last and train,
        }
        kwargs.update(overrides)
        return DataLoader(self.dataset(split), **kwargs)

    def train_dataloader(self) -> DataLoader:
        return self.loader("train")

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")
