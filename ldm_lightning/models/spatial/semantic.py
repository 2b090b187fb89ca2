"""Semantic synthesis: a one-hot semantic map, concatenated to z_t (LDM sec. 4.3.2, Fig. 8)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm_lightning.models.spatial.base import Encode, Inputs, SpatialCondition, check_size


class SemanticCondition(SpatialCondition):
    """``c = area(onehot(s))``: the one-hot map ``s`` ``[B, H, W]`` of class indices
    ``0..K-1`` averaged over each latent cell (the share of each class), as LDM's semantic
    synthesis model concatenates its downsampled maps (sec. 4.3.2). Index -1 means "no class"
    (a zero vector): the null condition is a map of -1 everywhere.

    Args:
        num_classes: K, the classes of the maps (2 for ``shapes``: background, shape).
        batch_key: the batch entry holding the map (``segmentation`` in ``shapes``).
    """

    kind = "semantic"
    data_hint = "data=shapes, or data=image_folder with data.segmentation_dir=<maps>"
    inputs = ("segmentation",)
    sample_usage = "task=semantic image=<map png>"

    def __init__(
        self, num_classes: int = 2, batch_key: str = "segmentation", p_uncond: float = 0.1
    ) -> None:
        super().__init__(p_uncond)
        if num_classes < 2:
            raise ValueError(f"model.spatial.num_classes={num_classes} must be at least 2")
        self.num_classes = num_classes
        self.batch_key = batch_key

    def channels(self, latent_channels: int) -> int:
        return self.num_classes

    def batch_inputs(self, batch: Mapping[str, Any], train: bool) -> Inputs:
        return {"segmentation": self.require(batch, self.batch_key)}

    def check(self, inputs: Mapping[str, Tensor], image_size: int) -> Inputs:
        segmentation = inputs["segmentation"]
        segmentation = segmentation if segmentation.ndim == 3 else segmentation[None]
        if segmentation.is_floating_point():
            raise ValueError("a semantic map holds class indices: give an integer tensor")
        low, high = int(segmentation.min()), int(segmentation.max())
        if low < -1 or high >= self.num_classes:
            raise ValueError(
                f"the semantic map has classes {low}..{high}, but this model knows 0.."
                f"{self.num_classes - 1} (and -1: none)"
            )
        check_size("the semantic map", segmentation, image_size,
                   f"draw it at {image_size}x{image_size}")
        return {"segmentation": segmentation.long()}

    def null_inputs(self, like: Inputs) -> Inputs:
        return {"segmentation": torch.full_like(like["segmentation"], -1)}

    def encode(self, inputs: Inputs, encode: Encode, latent_size: int) -> Tensor:
        segmentation = inputs["segmentation"].long()
        onehot = F.one_hot(segmentation.clamp(min=0), self.num_classes)
        onehot = (onehot * (segmentation >= 0)[..., None]).permute(0, 3, 1, 2).float()
        return F.interpolate(onehot, size=latent_size, mode="area")
