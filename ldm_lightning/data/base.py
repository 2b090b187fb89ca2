"""Shared LightningDataModule for image datasets.

Every dataset in this package yields samples as dicts::

    {"image": FloatTensor [3, H, W] in [-1, 1], "label": int, "caption": str}

so every stage (autoencoder, conditioner, diffusion) reads any dataset the same way.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

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

    def build_split(self, split: str) -> Dataset:  # pragma: no cover - abstract
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS:
            if split not in self.datasets:
                self.datasets[split] = self.build_split(split)

    def dataset(self, split: str) -> Dataset:
        self.setup()
        return self.datasets[split]

    def loader(self, split: str, shuffle: bool | None = None, **overrides: Any) -> DataLoader:
        """A DataLoader over ``split``; training shuffles and drops the last partial batch."""
        train = split == "train"
        kwargs: dict[str, Any] = dict(
            batch_size=self.batch_size,
            shuffle=train if shuffle is None else shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            drop_last=self.drop_last and train,
        )
        kwargs.update(overrides)
        return DataLoader(self.dataset(split), **kwargs)

    def train_dataloader(self) -> DataLoader:
        return self.loader("train")

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")
