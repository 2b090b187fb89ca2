"""Learning-rate rules shared by the stages."""

from __future__ import annotations

import pytorch_lightning as pl


def scaled_learning_rate(module: pl.LightningModule, base_lr: float, scale_lr: bool) -> float:
    """CompVis' rule: ``lr = base_lr * batch * devices * nodes * accumulate`` when ``scale_lr``.

    Keeps the per-sample step size fixed when the global batch grows (LDM's configs state
    ``base_learning_rate``; main.py multiplies it out). Without a trainer, ``base_lr``.
    """
    if not scale_lr or module._trainer is None:
        return float(base_lr)
    trainer = module.trainer
    batch = getattr(trainer.datamodule, "batch_size", 1) if trainer.datamodule else 1
    scale = batch * trainer.num_devices * trainer.num_nodes * trainer.accumulate_grad_batches
    return float(base_lr) * scale
