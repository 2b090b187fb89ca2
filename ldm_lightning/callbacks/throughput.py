"""Training throughput (images/s) and, on a GPU, peak memory, logged every training step."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch

IMAGES_PER_SEC = "train/images_per_sec"  # the metric's name, for readers (the progress lines)


def batch_size_of(batch: Any) -> int:
    """Images in a batch: the leading size of its ``image`` or ``latent`` tensor."""
    if isinstance(batch, dict):
        for key in ("image", "latent"):
            if key in batch:
                return int(batch[key].shape[0])
    if torch.is_tensor(batch):
        return int(batch.shape[0])
    raise ValueError(
        f"cannot tell the batch size of a {type(batch).__name__}; the throughput callback "
        "reads batches as dicts with an 'image' or 'latent' tensor."
    )


class ThroughputMonitor(pl.Callback):
    """Logs ``train/images_per_sec`` = world_size * B / (time between two batch ends).

    The interval spans data loading and the optimiser step, so it is what a run achieves; the
    first batch of an epoch (no previous end) is not measured, nor is time spent validating.
    On CUDA also logs ``train/gpu_mem_gb``, the peak allocated memory since the last step.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self._last: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = None

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        now = self.clock()
        last, self._last = self._last, now
        metrics: dict[str, float] = {}
        if last is not None and now > last:
            metrics[IMAGES_PER_SEC] = (
                batch_size_of(batch) * trainer.world_size / (now - last)
            )
        if pl_module.device.type == "cuda":
            metrics["train/gpu_mem_gb"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        if metrics:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
