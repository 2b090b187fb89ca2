"""Training throughput (images/s) and, on a GPU, peak memory, logged every ``log_every_n_steps``."""

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
    """Logs ``train/images_per_sec`` = world_size * images / seconds over the batches since the
    last log, at the optimizer steps the trainer logs at (``trainer.log_every_n_steps``).

    The interval spans data loading and the optimiser step, so it is what a run achieves; it
    starts at the first batch end of an epoch (or after validation), and time spent validating
    is not counted. On CUDA also logs ``train/gpu_mem_gb``, the peak allocated memory since the
    last log. Logging a Python number copies it to the module's device, which on CUDA waits for
    the queued work: once per log, not once per step, keeps the step free of host syncs.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self._start: float | None = None
        self._images = 0
        self._logged_step = -1

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = None

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        now, step = self.clock(), trainer.global_step
        if self._start is None:
            self._start, self._images = now, 0
        else:
            self._images += batch_size_of(batch)
        if step % trainer.log_every_n_steps or step == self._logged_step:
            return
        self._logged_step = step
        metrics: dict[str, float] = {}
        if self._images and now > self._start:
            metrics[IMAGES_PER_SEC] = self._images * trainer.world_size / (now - self._start)
            self._start, self._images = now, 0
        if pl_module.device.type == "cuda":
            metrics["train/gpu_mem_gb"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        if metrics:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
