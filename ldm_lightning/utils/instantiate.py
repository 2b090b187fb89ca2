"""Build callbacks and loggers from their config dicts (``callbacks/*.yaml``, ``logger/*.yaml``)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig
from pytorch_lightning import Callback
from pytorch_lightning.loggers import Logger


def _instantiate_named(cfg: DictConfig | None, kind: str) -> list:
    """Instantiate every entry with a ``_target_`` in a dict of named configs.

    An entry whose target returns None adds nothing: a factory that declines (the progress
    bar with ``trainer.enable_progress_bar=false``).
    """
    if not cfg:
        return []
    if not isinstance(cfg, DictConfig):
        raise TypeError(
            f"the {kind} config must be a dict of named entries, got {type(cfg).__name__}"
        )
    built = [
        hydra.utils.instantiate(entry)
        for entry in cfg.values()
        if isinstance(entry, DictConfig) and "_target_" in entry
    ]
    return [thing for thing in built if thing is not None]


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    return _instantiate_named(cfg, "callbacks")


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    return _instantiate_named(cfg, "logger")
