"""Shared LightningDataModule for image datasets.

Every dataset in this package yields samples as dicts::

    {"image": FloatTensor [3, H, W] in [-1, 1], "label": int, "caption": str}

so every stage (autoencoder, conditioner, diffusion) reads any dataset the same way. With
``cache_latents=True`` and a latent diffusion module in the trainer, each split is encoded
once by the frozen first stage and served from the on-disk latent cache instead, as
``{"latent": FloatTensor [C, h, w], "label": int, "caption": str}``.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ldm_lightning.data.latent_cache import CacheKey, build_latent_cache
from ldm_lightning.data.latent_dataset import LatentDataset

SPLITS = ("train", "val", "test")


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

    @property
    def name(self) -> str:
        """Short dataset name used in cache file names and run tags."""
        return type(self).__name__.removesuffix("DataModule").lower()

    def transform_signature(self) -> dict[str, Any]:
        """Every plain setting that determines the pixels; the latent cache keys on it.

        Collected from the instance's public attributes of plain types, so a new option in a
        subclass changes the key without anyone remembering to add it here. Loader settings
        (batch size, workers) do not change pixels and are left out.
        """
        plain = (int, float, str, bool, list, tuple, dict, type(None))
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
        fields = {
            k: v
            for k, v in vars(self).items()
            if not k.startswith("_") and k not in skip and isinstance(v, plain)
        }
        return {"datamodule": type(self).__qualname__, **fields}

    @property
    def num_classes(self) -> int:
        """Number of integer labels (0 when the dataset is unlabelled)."""
        return 0

    def build_split(self, split: str, augment: bool | None = None) -> Dataset:  # pragma: no cover
        """The dataset of ``split``; ``augment`` (default: train only): random crops, flips."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        module = self.trainer.lightning_module if self.trainer is not None else None
        use_cache = self.cache_latents and hasattr(module, "encode_for_cache")
        if self.cache_latents and module is not None and not use_cache:
            raise ValueError(
                f"data.cache_latents=true, but {type(module).__name__} has no first stage to "
                "encode with; set data.cache_latents=false for this model."
            )
        for split in SPLITS:
            if split not in self.datasets:
                self.datasets[split] = (
                    self._cached(split, module) if use_cache else self.build_split(split)
                )

    def _cached(self, split: str, module: pl.LightningModule) -> Dataset:
        """Latents of ``split`` from the cache, encoded once by ``module``'s first stage.

        The cache stores un-augmented images (centre crops) and, where the split flips at
        random, the latents of the mirrored images too; the dataset picks one of the two.
        """
        flip = split == "train" and bool(getattr(self, "flip", False))
        key = CacheKey(
            autoencoder_hash=module.first_stage_hash(),
            dataset=self.name,
            split=split,
            transforms=self.transform_signature(),
            flip=flip,
        )
        strategy = self.trainer.strategy
        device = strategy.root_device
        module.first_stage.to(device)

        def build(rank: int):
            return build_latent_cache(
                module.encode_for_cache,
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
