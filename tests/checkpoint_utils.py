"""Stage checkpoints made without a training run: from a built module, or a changed copy."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from ldm_lightning.models.checkpoints import read_checkpoint

# What Lightning saves to resume training; loading a stage (``load_stage``) reads none of it.
TRAINING_STATE = (
    "optimizer_states", "lr_schedulers", "loops", "callbacks", "current_model_state",
    "averaging_state",
)


def stage_only(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """``checkpoint`` without its training state: a quarter of the tensors, read 4x faster."""
    return {k: v for k, v in checkpoint.items() if k not in TRAINING_STATE}


def write_checkpoint(module: pl.LightningModule, path: Path) -> Path:
    """Save ``module`` as ``load_stage`` reads it: weights, hyperparameters and stage stamp."""
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def perturbed_copy(src: Path, dst: Path, seed: int = 0, std: float = 0.05) -> Path:
    """A copy of stage checkpoint ``src`` with Gaussian noise (``std``, seeded) on every float
    weight, without the training state.

    Noise also wakes up a briefly trained model: its zero-initialised output layers predict
    almost nothing, so its samples hardly depend on the sampler's settings.
    """
    checkpoint = stage_only(read_checkpoint(src))
    generator = torch.Generator().manual_seed(seed)

    def perturbed(value):
        if not (torch.is_tensor(value) and value.is_floating_point()):
            return value
        return value + std * torch.randn(value.shape, generator=generator, dtype=value.dtype)

    checkpoint["state_dict"] = {k: perturbed(v) for k, v in checkpoint["state_dict"].items()}
    torch.save(checkpoint, dst)
    return dst


def foreign_copy(src: Path, dst: Path) -> Path:
    """A copy of stage checkpoint ``src`` (without the training state) whose pickle names a
    global outside torch's weights-only allowlist (a harmless ``fractions.Fraction``): read only
    with ``trust_checkpoint``."""
    checkpoint = stage_only(read_checkpoint(src))
    checkpoint["foreign"] = Fraction(1, 3)
    torch.save(checkpoint, dst)
    return dst
