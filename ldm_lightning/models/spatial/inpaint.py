"""Inpainting: the masked image and the mask, concatenated to z_t (LDM sec. 4.5)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm_lightning.data.masks import random_masks
from ldm_lightning.models.spatial.base import Encode, Inputs, SpatialCondition, check_size


class InpaintCondition(SpatialCondition):
    """``c = concat[E(x * (1 - m)), area(m)]``: the first stage's normalised latent of the
    image with the region to fill set to 0 (mid-gray), and the mask ``m`` (1: fill) averaged
    over each latent cell (its coverage), as LDM's inpainting model (sec. 4.5) and Stable
    Diffusion's inpainting UNet (4 + 1 extra input channels) do. Training masks are random boxes
    and strokes (:func:`~ldm_lightning.data.masks.random_masks`). The null condition is the
    whole image to fill (``m = 1``, nothing known), which is unconditional generation.
    """

    kind = "inpaint"
    inputs = ("image", "mask")
    sample_usage = "task=inpaint image=<png> mask=<png>"

    def channels(self, latent_channels: int) -> int:
        return latent_channels + 1

    def batch_inputs(self, batch: Mapping[str, Any], train: bool) -> Inputs:
        image = self.require(batch, "image")
        generator = None if train else torch.Generator().manual_seed(0)
        masks = random_masks(len(image), image.shape[-1], generator).to(image.device)
        return {"image": image, "mask": masks}

    def check(self, inputs: Mapping[str, Tensor], image_size: int) -> Inputs:
        image, mask = inputs["image"].float(), inputs["mask"].float()
        image, mask = (v if v.ndim == 4 else v[None] for v in (image, mask))
        if mask.shape[1] != 1 or image.shape[1] != 3:
            raise ValueError(
                f"inpainting takes an RGB image [B, 3, H, W] and a one-channel mask "
                f"[B, 1, H, W]; got {tuple(image.shape)} and {tuple(mask.shape)}"
            )
        if mask.shape[-2:] != image.shape[-2:]:
            raise ValueError(
                f"the mask is {mask.shape[-1]}x{mask.shape[-2]} but the image is "
                f"{image.shape[-1]}x{image.shape[-2]} (WxH); give a mask of the image's size"
            )
        check_size("the image", image, image_size, f"resize it to {image_size}x{image_size}")
        if len(mask) != len(image):
            raise ValueError(f"{len(image)} images but {len(mask)} masks; give one mask each")
        return {"image": image, "mask": mask}

    def null_inputs(self, like: Inputs) -> Inputs:
        return {"image": torch.zeros_like(like["image"]), "mask": torch.ones_like(like["mask"])}

    def encode(self, inputs: Inputs, encode: Encode, latent_size: int) -> Tensor:
        mask = inputs["mask"]
        latent = encode(inputs["image"] * (1 - mask))
        return torch.cat([latent, F.interpolate(mask, size=latent_size, mode="area")], 1)
