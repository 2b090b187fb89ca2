"""Throughput monitor: images per second from the time between batch ends."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from ldm_lightning.callbacks.throughput import ThroughputMonitor, batch_size_of


class Linear(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.net(batch["image"].flatten(1)[:, :2]).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_images_per_second_from_a_fake_clock() -> None:
    ticks = iter(range(100))
    monitor = ThroughputMonitor(clock=lambda: 0.5 * next(ticks))  # 0.5 s between batch ends
    data = [{"image": torch.zeros(4, 3, 2, 2)}] * 3
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[monitor], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )
    trainer.fit(Linear(), DataLoader(data, batch_size=None))
    assert trainer.callback_metrics["train/images_per_sec"].item() == pytest.approx(4 / 0.5)
    assert "train/gpu_mem_gb" not in trainer.callback_metrics  # CPU run


def test_batch_size_of_dicts_and_tensors() -> None:
    assert batch_size_of({"latent": torch.zeros(5, 3, 4, 4)}) == 5
    assert batch_size_of(torch.zeros(7, 2)) == 7
    with pytest.raises(ValueError, match="'image' or 'latent'"):
        batch_size_of([1, 2])
