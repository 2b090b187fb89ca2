"""How a condition reaches the diffusion UNet: one class per kind, behind one seam.

- :class:`Conditioning` (``base.py``): the seam the LDM calls (training keyword tensors with
  condition dropout, ``(cond, uncond)`` for guided sampling, the UNet's constructor arguments,
  the record that rebuilds it from a checkpoint).
- :class:`NoConditioning` (``none``), :class:`ClassConditioning` (``class``: labels to the time
  embedding and/or class tokens), :class:`TextConditioning` (``text``: our caption encoder,
  pretrained CLIP-style or trained jointly), :class:`PretrainedTextConditioning`
  (``pretrained_text``: a ``transformers`` CLIP text encoder).
- :func:`build_conditioning` (``build.py``): a kind from its config (``_target_``), or from a
  checkpoint's config of earlier versions (``kind``).

A new kind is one subclass here plus one ``conf/model/conditioning/<kind>.yaml``.
"""

from ldm_lightning.models.conditioning.base import Conditioning, expand
from ldm_lightning.models.conditioning.build import (
    KINDS,
    build_conditioning,
    conditioning_class,
    conditioning_config,
)
from ldm_lightning.models.conditioning.classes import ClassConditioning
from ldm_lightning.models.conditioning.none import NoConditioning
from ldm_lightning.models.conditioning.pretrained_text import PretrainedTextConditioning
from ldm_lightning.models.conditioning.text import CaptionConditioning, TextConditioning

__all__ = [
    "KINDS",
    "CaptionConditioning",
    "ClassConditioning",
    "Conditioning",
    "NoConditioning",
    "PretrainedTextConditioning",
    "TextConditioning",
    "build_conditioning",
    "conditioning_class",
    "conditioning_config",
    "expand",
]
