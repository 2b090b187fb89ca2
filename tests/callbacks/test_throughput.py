"""Throughput monitor: images per second over each logging interval."""

from __future__ import annotations

from unittest.mock import patch

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from ldm_lightning.callbacks.throughput import IMAGES_PER_SEC, ThroughputMonitor, batch_size_of


class Linear(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.net(batch["image"].flatten(1)[:, :2]).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Recorder(pl.Callback):
    def __init__(self) -> None:
        self.logged: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % trainer.log_every_n_steps == 0:  # after the monitor's log
            self.logged[trainer.global_step] = trainer.callback_metrics[IMAGES_PER_SEC].item()


def test_images_per_second_over_each_logging_interval() -> None:
    # Batches of 4 images, one optimizer step each, ending 0.5 s apart but for step 5, which
    # takes 2 s (a slow step). Logged every 3 steps: steps 2-3 (the first batch end starts the
    # window) read 4 * 2 / 1.0, steps 4-6 read 4 * 3 / 3.0, the slow step averaged in.
    ends = iter([0.0, 0.5, 1.0, 1.5, 3.5, 4.0])
    monitor = ThroughputMonitor(clock=lambda: next(ends))
    recorder = Recorder()
    data = [{"image": torch.zeros(4, 3, 2, 2)}] * 6
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[monitor, recorder], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        log_every_n_steps=3,
    )
    model = Linear()
    with patch.object(model, "log_dict", wraps=model.log_dict) as log:
        trainer.fit(model, DataLoader(data, batch_size=None))
    assert log.call_count == 2  # at steps 3 and 6 only: no per-step copy to the device
    assert recorder.logged == {3: pytest.approx(8 / 1.0), 6: pytest.approx(12 / 3.0)}
    assert "train/gpu_mem_gb" not in trainer.callback_metrics  # CPU run


def test_batch_size_of_dicts_and_tensors() -> None:
    assert batch_size_of({"latent": torch.zeros(5, 3, 4, 4)}) == 5
    assert batch_size_of(torch.zeros(7, 2)) == 7
    with pytest.raises(ValueError, match="'image' or 'latent'"):
        batch_size_of([1, 2])
