"""Reading stage checkpoints with errors that say what was found and what to do.

Every LightningModule of this package stamps its checkpoints with its stage kind
(``"autoencoder"``, ``"conditioner"``, ``"latent_diffusion"``), so a later stage that is
pointed at the wrong file fails at start with a message, not with a shape error mid-run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import pytorch_lightning as pl
import torch

KIND_KEY = "ldm_lightning_kind"
MODULE_KEY = "ldm_lightning_module"
HOW_TO_MAKE = {
    "autoencoder": "train one with `python -m ldm_lightning.train +experiment=shapes_vq` "
    "(or shapes_kl, pets_vq, ...)",
    "conditioner": "train one with `python -m ldm_lightning.train +experiment=shapes_clip`",
    "latent_diffusion": "train one with `python -m ldm_lightning.train +experiment=shapes_ldm`",
}

M = TypeVar("M", bound=pl.LightningModule)


def stamp(checkpoint: dict[str, Any], kind: str, module: pl.LightningModule) -> None:
    """Record the stage kind and class in a checkpoint dict (call from ``on_save_checkpoint``)."""
    checkpoint[KIND_KEY] = kind
    checkpoint[MODULE_KEY] = f"{type(module).__module__}.{type(module).__qualname__}"


def read_checkpoint(path: str | Path, config_key: str = "ckpt_path") -> dict[str, Any]:
    """``torch.load`` a Lightning checkpoint on the CPU, with clear errors for bad paths."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{config_key}={path} does not exist. Point {config_key} at a .ckpt file written by "
            "`python -m ldm_lightning.train` (see the run directory's checkpoints/ folder)."
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise ValueError(
            f"{config_key}={path} could not be read as a checkpoint "
            f"({type(error).__name__}: {error}). The file is corrupt or truncated; "
            "point to another checkpoint (e.g. last.ckpt)."
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{config_key}={path} is not a Lightning checkpoint (no 'state_dict').")
    return checkpoint


def checkpoint_kind(checkpoint: dict[str, Any]) -> str:
    return checkpoint.get(KIND_KEY, "unknown (not written by ldm-lightning)")


def require_kind(
    checkpoint: dict[str, Any], expected: str, path: str | Path, config_key: str = "ckpt_path"
) -> None:
    """Raise a ValueError naming what ``path`` holds when it is not an ``expected`` checkpoint."""
    found = checkpoint_kind(checkpoint)
    if found != expected:
        raise ValueError(
            f"{config_key}={path} is a {found} checkpoint, but an {expected} checkpoint is needed "
            f"here; {HOW_TO_MAKE.get(expected, '')}."
        )


def load_stage(
    cls: type[M], path: str | Path, kind: str, config_key: str = "ckpt_path", **overrides: Any
) -> M:
    """Check the kind of ``path`` and load it as ``cls`` (on the CPU, in eval mode).

    Builds the module from the checkpoint's saved hyperparameters (``overrides`` win) and loads
    its weights, as ``LightningModule.load_from_checkpoint`` does, but reads the file once.
    """
    checkpoint = read_checkpoint(path, config_key)
    require_kind(checkpoint, kind, path, config_key)
    hparams = {**checkpoint.get("hyper_parameters", {}), **overrides}
    module = cls(**hparams)
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()
