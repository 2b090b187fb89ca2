"""``checkpoints/last.ckpt``: rewritten at every epoch end and, optionally, every N training steps.

``last.ckpt`` is what resume (``ckpt_path=<run>/checkpoints/last.ckpt``), sampling and the next
stage read. Written only at epoch ends, a kill on a preemptible machine loses up to an epoch,
which on a large dataset is hours. Lightning's ``ModelCheckpoint`` cannot do both on its own:
``every_n_train_steps`` and ``every_n_epochs`` are mutually exclusive, and with
``every_n_train_steps`` alone nothing is written at the end of an epoch or of training. (Its
``save_last`` does not help either: it rewrites ``last.ckpt`` only in an epoch that also saved
a best checkpoint.) So this is a per-epoch ``ModelCheckpoint`` that also saves every N steps.

A run resumed from a mid-epoch ``last.ckpt`` finishes the interrupted epoch with only the
batches still missing from it (Lightning restores the batch count within the epoch; a
dataloader without ``state_dict`` is restarted, so these are the first batches of a fresh
shuffle), and ends at the same global step and epoch as an uninterrupted run.
"""

from __future__ import annotations

import os
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint


class LastCheckpoint(ModelCheckpoint):
    """``<dirpath>/last.ckpt`` after every epoch and, if ``every_n_train_steps``, every N steps.

    ``every_n_train_steps`` counts optimizer steps (``trainer.global_step``) since the last save
    of this run (or its start): a manual-optimisation module that steps two optimizers per
    batch (the autoencoder's G and D) advances it by two per batch, and is never skipped over.
    The last batch of an epoch is left to the epoch-end save.
    """

    def __init__(self, dirpath: str | os.PathLike, every_n_train_steps: int | None = None) -> None:
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(
                f"every_n_train_steps={every_n_train_steps}: use a positive number of steps, "
                "or null to write last.ckpt at epoch ends only"
            )
        super().__init__(
            dirpath=dirpath,
            filename="last",
            monitor=None,
            save_top_k=1,
            enable_version_counter=False,
            # Every epoch end, even one without validation (check_val_every_n_epoch > 1).
            save_on_train_epoch_end=True,
        )
        self.every_n_train_steps = every_n_train_steps
        self._step_saved = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._step_saved = trainer.global_step  # a resumed run counts from its checkpoint

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)  # the epoch-end save
        self._step_saved = trainer.global_step

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # ModelCheckpoint's own hook saves only for its every_n_train_steps, which is 0 here.
        n = self.every_n_train_steps
        if not n or trainer.global_step < self._step_saved + n or trainer.fast_dev_run:
            return
        # The epoch-end save follows this batch, after validation. A save here instead would
        # resume past that validation: Lightning counts the epoch as trained and skips it.
        if trainer.is_last_batch or batch_idx + 1 >= trainer.num_training_batches:
            return
        trainer.save_checkpoint(self.format_checkpoint_name({}), self.save_weights_only)
        self._step_saved = trainer.global_step
