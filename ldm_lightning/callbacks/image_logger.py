"""Log a module's image grids every validation epoch: as PNG files and to every logger."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from ldm_lightning.utils.images import save_png, to_grid


class ImageLogger(pl.Callback):
    """Calls ``pl_module.log_images(batch)`` on the first validation batch of an epoch.

    ``log_images`` returns ``{name: images}`` or ``{name: (images, images_per_row)}`` with
    images ``[N, 3, H, W]`` in [-1, 1]. Each grid is saved as
    ``<save_dir>/<name>_epoch<E>_step<S>.png`` and sent to wandb / TensorBoard when in use.
    Runs under the EMA weights when an EMA callback swaps them in for validation.
    """

    def __init__(self, save_dir: str | Path, every_n_epochs: int = 1) -> None:
        self.save_dir = Path(save_dir)
        self.every_n_epochs = every_n_epochs
        self.saved: list[Path] = []

    @rank_zero_only
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if (
            batch_idx != 0
            or trainer.sanity_checking
            or not hasattr(pl_module, "log_images")
            or trainer.current_epoch % self.every_n_epochs
        ):
            return
        was_training = pl_module.training
        pl_module.eval()
        grids = pl_module.log_images(batch)
        pl_module.train(was_training)
        for name, value in grids.items():
            images, nrow = value if isinstance(value, tuple) else (value, None)
            grid = to_grid(images, nrow)
            stem = f"{name}_epoch{trainer.current_epoch:03d}_step{trainer.global_step:06d}"
            self.saved.append(save_png(grid, self.save_dir / f"{stem}.png"))
            self._send(trainer, name, grid)

    @staticmethod
    def _send(trainer: pl.Trainer, name: str, grid: torch.Tensor) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=f"images/{name}", images=[grid], step=trainer.global_step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(f"images/{name}", grid, trainer.global_step)
