"""Training progress where stdout is not a terminal: plain log lines instead of a live bar.

Lightning's rich bar draws only on a terminal; with output to a file (nohup, SLURM, CI) it
shows nothing until the run ends. :func:`progress_bar` keeps the rich bar on a terminal and
otherwise returns :class:`LineProgress`, which logs one line every ``every_n_steps`` optimizer
steps and one per epoch end, validation and test. Being a ``ProgressBar``, either one stops
Lightning from adding its default bar beside it.
"""

from __future__ import annotations

import datetime
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar
from pytorch_lightning.callbacks.progress import ProgressBar

from ldm_lightning.callbacks.throughput import IMAGES_PER_SEC

log = logging.getLogger(__name__)


def progress_bar(
    every_n_steps: int = 50, enabled: bool = True, stream: TextIO | None = None
) -> ProgressBar | None:
    """The rich bar where ``stream`` (default stdout) is a terminal, :class:`LineProgress`
    elsewhere; None when ``enabled`` is false (``trainer.enable_progress_bar=false``, where
    Lightning refuses a progress bar among the callbacks)."""
    if not enabled:
        return None
    if (stream or sys.stdout).isatty():
        return RichProgressBar()
    return LineProgress(every_n_steps)


def format_duration(seconds: float) -> str:
    """``H:MM:SS``, whole seconds."""
    return str(datetime.timedelta(seconds=round(seconds)))


def format_line(
    position: str,
    metrics: Mapping[str, float],
    images_per_sec: float | None = None,
    elapsed: float | None = None,
    eta: float | None = None,
) -> str:
    """``position | name=value ... | N images/s | elapsed H:MM:SS | ETA H:MM:SS``; parts that
    are unknown (None, no metrics) are left out."""
    parts = [position]
    if metrics:
        parts.append(" ".join(f"{name}={float(value):.4g}" for name, value in metrics.items()))
    if images_per_sec is not None:
        parts.append(f"{images_per_sec:.1f} images/s")
    if elapsed is not None:
        parts.append(f"elapsed {format_duration(elapsed)}")
    if eta is not None:
        parts.append(f"ETA {format_duration(eta)}")
    return " | ".join(parts)


def batches_this_epoch(trainer: pl.Trainer) -> int:
    """Training batches run so far in the current epoch."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed


def fraction_done(trainer: pl.Trainer) -> float | None:
    """The share of ``fit`` done, by whichever of ``max_steps`` (optimizer steps) and
    ``max_epochs`` (batches) ends it first; None when neither bounds the run.

    Batches, not steps, measure the epochs: the autoencoder steps two optimizers per batch.
    """
    fractions = []
    if trainer.max_steps > 0:
        fractions.append(trainer.global_step / trainer.max_steps)
    batches = trainer.num_training_batches
    if trainer.max_epochs not in (None, -1) and 0 < batches < math.inf:
        done = trainer.current_epoch + batches_this_epoch(trainer) / batches
        fractions.append(done / max(trainer.max_epochs, 1))
    return min(max(fractions), 1.0) if fractions else None


class LineProgress(ProgressBar):
    """Logs training progress as lines (``logging`` at INFO, which Hydra sends to stdout and the
    run's ``.log`` file): every ``every_n_steps`` optimizer steps and at each epoch end, the
    epoch, batch, step and share done, the progress-bar metrics (what the module logs with
    ``prog_bar=True``), images/s (from the throughput callback, when it runs), time elapsed
    and the ETA; and a line as validation and testing start and end, with their metrics.
    """

    def __init__(
        self, every_n_steps: int = 50, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.clock = clock
        self._enabled = True
        self._fit_start = 0.0
        self._start_fraction = 0.0  # a resumed run's ETA counts from where it resumed
        self._last_step = 0
        self._stage_start = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args: Any, sep: str = " ", **kwargs: Any) -> None:
        """``LightningModule.print`` and the like: a log line (``print``'s other options unused)."""
        if self._enabled:
            log.info(sep.join(map(str, args)))

    # ---------------------------------------------------------------------------- training
    def training_line(self, trainer: pl.Trainer, pl_module: pl.LightningModule, label: str) -> str:
        """The line at the current step, ``label`` first (``epoch``, ``end of epoch``)."""
        epoch = f"{label} {trainer.current_epoch}"
        if trainer.max_epochs not in (None, -1):
            epoch += f"/{trainer.max_epochs - 1}"  # 0-based, as Lightning's bar and checkpoints
        batch = batches_this_epoch(trainer)
        step = f"step {trainer.global_step}"
        if trainer.max_steps > 0:
            step += f"/{trainer.max_steps}"
        position = f"{epoch} batch {batch}/{trainer.num_training_batches} {step}"
        fraction = fraction_done(trainer)
        eta = None
        elapsed = self.clock() - self._fit_start
        if fraction is not None:
            position += f" {100 * fraction:.0f}%"
            if fraction > self._start_fraction:
                eta = elapsed * (1 - fraction) / (fraction - self._start_fraction)
        metrics = self.get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version: not progress
        images_per_sec = trainer.callback_metrics.get(IMAGES_PER_SEC)
        return format_line(
            position,
            metrics,
            None if images_per_sec is None else float(images_per_sec),
            elapsed,
            eta,
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = self.clock()
        self._start_fraction = fraction_done(trainer) or 0.0
        self._last_step = trainer.global_step

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        # Crossing a multiple, not hitting it: two optimizers step twice per batch.
        if step // self.every_n_steps > self._last_step // self.every_n_steps:
            self._last_step = step
            self.print(self.training_line(trainer, pl_module, "epoch"))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.print(self.training_line(trainer, pl_module, "end of epoch"))

    # ---------------------------------------------------------------------------- evaluation
    def _stage_started(self, name: str, batches: float) -> None:
        self._stage_start = self.clock()
        self.print(f"{name}: {batches} batches")

    def _stage_ended(self, trainer: pl.Trainer, name: str, prefix: str) -> None:
        metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}
        self.print(format_line(f"{name} done", metrics, elapsed=self.clock() - self._stage_start))

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._stage_started(self.validation_description, self.total_val_batches)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._stage_ended(trainer, self.validation_description, "val/")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stage_started(self.test_description, sum(trainer.num_test_batches))

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stage_ended(trainer, self.test_description, "test/")
