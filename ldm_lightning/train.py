"""Train any stage from a Hydra config: ``python -m ldm_lightning.train +experiment=shapes_vq``.

Seeds everything, instantiates datamodule, module, callbacks, loggers and trainer from the
config, prints and saves the resolved config, fits (resuming from ``ckpt_path``), tests the
best checkpoint and returns ``optimized_metric`` for sweeps.
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ldm_lightning.models import connect
from ldm_lightning.models.from_data import fill_from_data
from ldm_lightning.utils.config_tree import print_config_tree
from ldm_lightning.utils.instantiate import instantiate_callbacks, instantiate_loggers
from ldm_lightning.utils.wandb import finish_wandb

log = logging.getLogger(__name__)


def metric_value(metrics: dict[str, Any], name: str | None, sweep: bool = False) -> float | None:
    """The value of ``name`` among the logged metrics, for Hydra sweepers to optimise.

    Not logged (say a short run that never validated): an error in a ``sweep``, which has
    nothing to optimise then, and otherwise a warning, and None.
    """
    if not name:
        return None
    if name in metrics:
        return float(metrics[name])
    validated = any(key.startswith("val/") for key in metrics)
    problem = (
        f"optimized_metric={name!r} was not logged"
        + ("" if validated else ": no validation ran")
        + f". Logged metrics: {sorted(metrics)}."
    )
    if sweep:
        raise KeyError(
            f"{problem} The sweep optimises it: set optimized_metric to one of them, or make "
            "validation run (trainer.check_val_every_n_epoch, +trainer.val_check_interval, "
            "+trainer.limit_val_batches)."
        )
    log.warning("%s Nothing to return to a sweeper; the run itself is complete.", problem)
    return None


def resume_path(trainer: pl.Trainer, cfg: DictConfig) -> str | None:
    """``cfg.ckpt_path``, unless a requeued SLURM job left a newer hpc checkpoint.

    Lightning resumes from ``hpc_ckpt_N.ckpt`` by itself only when no ``ckpt_path`` is given;
    after a preemption the hpc checkpoint is the newer state, so it wins.
    """
    from pytorch_lightning.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect() and trainer._checkpoint_connector._hpc_resume_path:
        return "hpc"
    return cfg.get("ckpt_path")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit and test one run; returns the logged metrics (fit and test merged)."""
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    if cfg.get("matmul_precision"):
        torch.set_float32_matmul_precision(cfg.matmul_precision)
    print_config_tree(cfg, save_dir=cfg.paths.output_dir)

    log.info("Instantiating datamodule <%s>", cfg.data._target_)
    datamodule: pl.LightningDataModule = hydra.utils.instantiate(cfg.data)
    log.info("Instantiating model <%s>", cfg.model._target_)
    model: pl.LightningModule = hydra.utils.instantiate(fill_from_data(cfg.model, datamodule))
    connect(model, datamodule)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)

    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    try:
        if cfg.get("train", True):
            trainer.fit(model, datamodule=datamodule, ckpt_path=resume_path(trainer, cfg))
        metrics = dict(trainer.callback_metrics)
        if cfg.get("test", False):
            best = (
                trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            )
            if not best:
                log.warning("No best checkpoint was saved; testing the current weights.")
            trainer.test(model, datamodule=datamodule, ckpt_path=best or None)
            metrics.update(trainer.callback_metrics)
    finally:
        finish_wandb()
    return {k: v.item() if torch.is_tensor(v) else v for k, v in metrics.items()}


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    return metric_value(metrics, cfg.get("optimized_metric"), sweep=sweep)


if __name__ == "__main__":
    main()
