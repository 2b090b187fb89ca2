"""The LightningModules of the three stages, and the noisy classifier of classifier guidance."""

from ldm_lightning.models.autoencoder import AutoencoderModule
from ldm_lightning.models.conditioner import ConditionerModule
from ldm_lightning.models.diffusion import LatentDiffusionModule
from ldm_lightning.models.handshake import connect
from ldm_lightning.models.noisy_classifier import NoisyClassifierModule

__all__ = [
    "AutoencoderModule",
    "ConditionerModule",
    "LatentDiffusionModule",
    "NoisyClassifierModule",
    "connect",
]
