"""Spatial conditions concatenated to the backbone's input (LDM sec. 3.3, 4.3-4.5).

- :class:`SpatialCondition` (``base.py``): the seam (pixel inputs from a batch or a caller,
  their null for condition dropout and guidance, the latent-resolution condition).
- :class:`InpaintCondition` (``inpaint``), :class:`UpscaleCondition` (``upscale``),
  :class:`SemanticCondition` (``semantic``).
- :func:`build_spatial` (``build.py``): a kind from its config (``_target_``), recorded in the
  checkpoint; :class:`SpatialHolder` (``holder.py``): the LDM's side.

A new kind is one subclass here plus one ``conf/model/spatial/<kind>.yaml``.
"""

from ldm_lightning.models.spatial.base import SpatialCondition
from ldm_lightning.models.spatial.build import build_spatial
from ldm_lightning.models.spatial.holder import SpatialHolder
from ldm_lightning.models.spatial.inpaint import InpaintCondition
from ldm_lightning.models.spatial.semantic import SemanticCondition
from ldm_lightning.models.spatial.upscale import UpscaleCondition, downsample

__all__ = [
    "InpaintCondition",
    "SemanticCondition",
    "SpatialCondition",
    "SpatialHolder",
    "UpscaleCondition",
    "build_spatial",
    "downsample",
]
