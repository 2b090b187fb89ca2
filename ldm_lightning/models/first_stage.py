"""The frozen first stage of a latent diffusion model: an autoencoder, or the identity.

With the identity, "latents" are pixels and the same diffusion module is a pixel-space DDPM,
so latent vs pixel diffusion is one config switch (``model.first_stage.identity=true``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ldm_lightning.models.autoencoder import AutoencoderModule
from ldm_lightning.models.checkpoints import load_stage, stage_sha256

CONFIG_KEY = "model.first_stage.ckpt_path"


class IdentityFirstStage(nn.Module):
    """``encode`` and ``decode`` are the identity; ``factor`` 1."""

    factor = 1

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.latent_channels = channels

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


def build_first_stage(
    ckpt_path: str | None = None,
    identity: bool = False,
    hparams: dict[str, Any] | None = None,
    sha256: str | None = None,
    channels: int = 3,
    trust_checkpoint: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the frozen first stage and the record of where it came from.

    - ``identity``: pixel space.
    - ``hparams`` given: the architecture only; the weights come with the diffusion checkpoint
      that recorded them (so a diffusion checkpoint alone is enough to sample).
    - else ``ckpt_path``: an autoencoder checkpoint (a ``.ckpt`` or an export folder), checked
      for its kind, loaded (refusing a pickle that names code unless ``trust_checkpoint``),
      frozen.

    Returns ``(module, record)`` where ``record`` is the ``first_stage`` config to save, with
    the autoencoder's hyperparameters and the checkpoint file's sha256 filled in.
    """
    record = {"ckpt_path": ckpt_path, "identity": identity, "hparams": hparams, "sha256": sha256}
    if identity:
        module: nn.Module = IdentityFirstStage(channels)
        record["sha256"] = "identity"
    elif hparams is not None:
        module = AutoencoderModule(**hparams)
    elif ckpt_path:
        module = load_stage(
            AutoencoderModule, ckpt_path, "autoencoder", CONFIG_KEY, trust_checkpoint
        )
        record["hparams"] = dict(module.hparams)
        record["sha256"] = stage_sha256(ckpt_path)
    else:
        raise ValueError(
            f"{CONFIG_KEY} is not set. Train an autoencoder first "
            "(`python -m ldm_lightning.train +experiment=shapes_vq`) and pass "
            f"{CONFIG_KEY}=<run dir>/checkpoints/last.ckpt, or set "
            "model.first_stage.identity=true for pixel-space diffusion."
        )
    module.requires_grad_(False)
    module.eval()
    return module, record
