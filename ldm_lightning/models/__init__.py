"""The LightningModules of the three stages."""

from ldm_lightning.models.autoencoder import AutoencoderModule

__all__ = ["AutoencoderModule"]
