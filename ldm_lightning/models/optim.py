"""Learning-rate rules shared by the stages."""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch

log = logging.getLogger(__name__)


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


def adamw_with_warmup(
    module: pl.LightningModule, settings: dict[str, Any] | None, defaults: dict[str, Any]
) -> dict[str, Any]:
    """AdamW on the trainable parameters with a linear warm-up, as Lightning's optimizer dict.

    ``settings`` (``base_lr``, ``scale_lr``, ``betas``, ``weight_decay``, ``warmup_steps``)
    override ``defaults``; the rate is :func:`scaled_learning_rate` and rises linearly from
    ``1/warmup_steps`` of it to all of it over the first ``warmup_steps`` optimizer steps.
    """
    cfg = {
        "scale_lr": False,
        "weight_decay": 0.0,
        "warmup_steps": 0,
        **defaults,
        **(settings or {}),
    }
    lr = scaled_learning_rate(module, cfg["base_lr"], cfg["scale_lr"])
    log.info("%s learning rate %.3g", type(module).__name__, lr)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=lr, betas=tuple(cfg["betas"]), weight_decay=cfg["weight_decay"]
    )
    warmup = max(int(cfg["warmup_steps"]), 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
