"""Checkpoints along training time, each stamped with the seconds trained: quality-vs-time curves.

Comparing variants at equal wall-clock budget (``trainer.max_time``, LDM sec. 4.1, Fig. 6)
needs their quality at equal times, not at equal steps: a pixel-space step costs many latent
steps. :class:`TimedCheckpoints` writes ``<dirpath>/t<seconds>s-step<step>.ckpt`` every
``every_seconds`` of training and once when training ends, and records in every checkpoint the
trainer writes while it runs (``last.ckpt`` and the best one included) a ``training_time`` dict:

- ``train_seconds``: time since training started (``on_train_start``) less the time in
  validation (``on_validation_start`` to ``on_validation_end``: the validation loss, the image
  grids and FID callbacks run there, and the swap to EMA weights) and in its own checkpoint
  writes. It includes data loading, forward, backward and optimizer steps, EMA updates, the
  other callbacks' per-batch work (logging, progress), the per-epoch ``last.ckpt`` write and
  the best checkpoint's (Lightning runs checkpoint callbacks after this one, so
  ``ModelCheckpoint`` writes after validation has ended here).
  It excludes what runs before ``on_train_start``: the sanity check, building the latent
  cache and estimating the latent scale.
- ``wall_seconds``: all the time since training started, what ``trainer.max_time`` counts
  (Lightning's ``Timer`` also starts at ``on_train_start``).
- ``global_step`` and ``epoch``.

Both clocks are saved in the callback's state and continue on resume. Under DDP, rank 0's
clock decides when every rank saves.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

TIME_KEY = "training_time"  # the checkpoint's entry (read by ldm_lightning.metrics.comparison)


class TimedCheckpoints(pl.Callback):
    """Saves a checkpoint every ``every_seconds`` of training time and at the end of training.

    Times are in seconds of :attr:`train_seconds` (validation excluded; see the module's
    docstring); the checks run after each training batch, so a save comes at the end of the
    first batch past each multiple of ``every_seconds``.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike,
        every_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not every_seconds > 0:
            raise ValueError(f"every_seconds={every_seconds}: use a positive number of seconds")
        self.dirpath = Path(dirpath)
        self.every_seconds = float(every_seconds)
        self.clock = clock
        self.saved: list[Path] = []
        self._train_before = 0.0  # train seconds of earlier runs (resume) and earlier segments
        self._wall_before = 0.0
        self._segment_start: float | None = None  # None: the training clock is stopped
        self._wall_start: float | None = None  # None: not training
        self._next_save = self.every_seconds
        self._saved_step = -1

    # ------------------------------------------------------------------ the clocks
    @property
    def train_seconds(self) -> float:
        running = self.clock() - self._segment_start if self._segment_start is not None else 0.0
        return self._train_before + running

    @property
    def wall_seconds(self) -> float:
        running = self.clock() - self._wall_start if self._wall_start is not None else 0.0
        return self._wall_before + running

    def _stop(self) -> None:
        if self._segment_start is not None:
            self._train_before = self.train_seconds
            self._segment_start = None

    def _start(self) -> None:
        if self._wall_start is not None and self._segment_start is None:
            self._segment_start = self.clock()

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._wall_start = self.clock()
        self._start()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start()  # a no-op in the sanity check and in validate(): not training

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.fast_dev_run:
            return
        # Rank 0's clock for every rank: trainer.save_checkpoint is called on all of them.
        seconds = trainer.strategy.broadcast(self.train_seconds)
        if seconds < self._next_save:
            return
        self._save(trainer)
        self._next_save = (math.floor(seconds / self.every_seconds) + 1) * self.every_seconds

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.fast_dev_run and trainer.global_step != self._saved_step:
            self._save(trainer)
        self._stop()
        self._wall_before, self._wall_start = self.wall_seconds, None

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._wall_start is not None:  # only checkpoints written while training
            checkpoint[TIME_KEY] = self.stamp(trainer)

    def stamp(self, trainer: pl.Trainer) -> dict[str, float | int]:
        """What :data:`TIME_KEY` records: both clocks, the step and the epoch."""
        return {
            "train_seconds": round(self.train_seconds, 3),
            "wall_seconds": round(self.wall_seconds, 3),
            "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
        }

    def _save(self, trainer: pl.Trainer) -> None:
        self._stop()  # the write itself is not training
        seconds = trainer.strategy.broadcast(self.train_seconds)
        path = self.dirpath / f"t{int(seconds):06d}s-step{trainer.global_step:07d}.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # callbacks stamp full ones only
        self.saved.append(path)
        self._saved_step = trainer.global_step
        self._start()

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, float]:
        return {
            "train_seconds": self.train_seconds,
            "wall_seconds": self.wall_seconds,
            "next_save": self._next_save,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._train_before = float(state_dict["train_seconds"])
        self._wall_before = float(state_dict["wall_seconds"])
        self._next_save = float(state_dict["next_save"])
