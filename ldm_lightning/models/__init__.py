"""The LightningModules of the three stages."""

from ldm_lightning.models.autoencoder import AutoencoderModule
from ldm_lightning.models.conditioner import ConditionerModule
from ldm_lightning.models.diffusion import LatentDiffusionModule
from ldm_lightning.models.handshake import connect

__all__ = ["AutoencoderModule", "ConditionerModule", "LatentDiffusionModule", "connect"]
