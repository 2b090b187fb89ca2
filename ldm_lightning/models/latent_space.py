"""The normalised latent space of the stages that train on it: latent diffusion and the noisy
classifier of classifier guidance.

Both see images as ``z0 = normalize(E(x))``: the frozen first stage's latents (read from the
latent cache, or encoded on the fly), normalised by a
:class:`~ldm_lightning.diffusion.latent_norm.LatentNormalizer` estimated from the training data
at the start of fit unless fixed, and carried in the checkpoint. One mixin, so a classifier
and a diffusion model on the same first stage and data see the same latents.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ldm_lightning.data.interface import DataSource
from ldm_lightning.diffusion.latent_norm import LatentNormalizer
from ldm_lightning.models.checkpoints import stamp
from ldm_lightning.models.first_stage import FirstStageHolder
from ldm_lightning.models.optim import build_optimizer
from ldm_lightning.models.speed import rank_generator

log = logging.getLogger(__name__)


class LatentSpace(FirstStageHolder):
    """Mixin of the LightningModules trained on normalised latents of a frozen first stage.

    Gives them the first stage and the latent normalisation (:meth:`attach_latent_space`), the
    latents of a batch (:meth:`latents`), the estimate of the normalisation and a per-rank noise
    generator at the start of fit, the data handshake at setup (:meth:`adopt_data`), and the
    checkpoint entries: the stage stamp (``kind``) and the normalisation; and the optimizer of
    its trainable parameters from ``hparams.optimizer`` (defaults: ``default_optimizer``).
    """

    kind: str
    default_optimizer: dict[str, Any]
    latent_norm: LatentNormalizer
    noise_generator: torch.Generator | None = None

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer, scheduler = build_optimizer(
            self, params, self.hparams.optimizer, self.default_optimizer
        )
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def attach_latent_space(
        self, first_stage: dict[str, Any] | None, scale_factor: float | None, latent_norm: str
    ) -> None:
        """Build the frozen first stage (recorded in ``hparams.first_stage``) and the latent
        normalisation ("scalar" | "channel"; a fixed ``scale_factor``, or None to estimate it).
        Call after ``save_hyperparameters``."""
        self.latent_norm = LatentNormalizer(scale_factor, latent_norm)
        self.attach_first_stage(first_stage)

    @property
    def scale_factor(self) -> float | None:
        """The latent scale ``1 / std(z)``; None until estimated or loaded, and in channel mode
        (``latent_norm.mean`` and ``latent_norm.std`` hold the per-channel statistics)."""
        return self.latent_norm.scale

    def latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """Normalised latents ``z0`` (``scale_factor * E(x)``, or per channel: ``latent_norm``) of
        a batch of images or cached latents."""
        return self.latent_norm.normalize(self.unscaled_latents(batch).float())

    @torch.no_grad()
    def unscaled_latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """``E(x)``: the cached latents of a batch, or its images encoded by the first stage."""
        if "latent" in batch:
            return batch["latent"].to(self.device)
        return self.first_stage.encode(batch["image"].to(self.device))

    # ------------------------------------------------------------------ data
    def setup(self, stage: str) -> None:
        if self._data is not None:
            self.adopt_data(self._data)

    def adopt_data(self, data: DataSource) -> None:
        """Check ``data`` against the model and take what the config left open (recorded in
        ``hparams``, so the checkpoint keeps it)."""

    def on_fit_start(self) -> None:
        self.noise_generator = rank_generator(self)
        if not self.latent_norm.fitted:
            # Over the first ``scale_factor_batches`` training batches; rank 0's for all ranks.
            data = self.data_source("the latent scale factor (model.scale_factor: null)")
            self.latent_norm.fit(data.latent_stats(self.hparams.scale_factor_batches))
            state = self.trainer.strategy.broadcast(self.latent_norm.state(), src=0)
            self.latent_norm.load_state(state)
            log.info("Latent normalisation estimated from data: %r", self.latent_norm)

    def log_latent_norm(self) -> None:
        """Log the normalisation (``scale_factor``, or ``latent_mean/<c>``, ``latent_std/<c>``)."""
        self.log_dict(self.latent_norm.summary(), on_epoch=True, batch_size=1)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stamp(checkpoint, self.kind, self)
        checkpoint.update(self.latent_norm.state())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.latent_norm.load_state(checkpoint)
