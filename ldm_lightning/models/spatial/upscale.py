"""Super-resolution: the bicubic low-resolution image, concatenated to z_t (LDM-SR, sec. 4.4)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm_lightning.models.spatial.base import Encode, Inputs, SpatialCondition, check_size


def downsample(images: Tensor, factor: int) -> Tensor:
    """``[B, 3, H, W]`` -> ``[B, 3, H/factor, W/factor]`` by antialiased bicubic interpolation,
    the degradation of LDM-SR (sec. 4.4, after SR3: bicubic with anti-aliasing)."""
    size = images.shape[-1] // factor
    return F.interpolate(images, size=size, mode="bicubic", antialias=True).clamp(-1, 1)


class UpscaleCondition(SpatialCondition):
    """``c = bicubic(lr, latent size)``: the low-resolution image ``lr = downsample(x, factor)``
    brought to the latent resolution (unchanged when it is already there: factor 4 on an f=4
    first stage, LDM-SR's setting, "concatenating the low-resolution conditioning y and the
    inputs to the UNet", sec. 4.4). The null condition is a mid-gray image (0).

    Args:
        factor: the upscaling factor; the model's image size must be a multiple of it.
    """

    kind = "upscale"
    inputs = ("image",)
    sample_usage = "task=upscale image=<low-resolution png>"

    def __init__(self, factor: int = 4, p_uncond: float = 0.0) -> None:
        super().__init__(p_uncond)
        if factor < 1:
            raise ValueError(f"model.spatial.factor={factor} must be a positive integer")
        self.factor = factor

    def channels(self, latent_channels: int) -> int:
        return 3

    def batch_inputs(self, batch: Mapping[str, Any], train: bool) -> Inputs:
        return {"image": downsample(self.require(batch, "image"), self.factor)}

    def check(self, inputs: Mapping[str, Tensor], image_size: int) -> Inputs:
        image = inputs["image"].float()
        image = image if image.ndim == 4 else image[None]
        if image_size % self.factor:
            raise ValueError(f"image size {image_size} is not a multiple of factor {self.factor}")
        size = image_size // self.factor
        check_size(
            "the low-resolution image", image, size,
            f"it is upscaled x{self.factor} to the model's {image_size}x{image_size}: give a "
            f"{size}x{size} image",
        )
        return {"image": image}

    def null_inputs(self, like: Inputs) -> Inputs:
        return {"image": torch.zeros_like(like["image"])}

    def encode(self, inputs: Inputs, encode: Encode, latent_size: int) -> Tensor:
        image = inputs["image"]
        if image.shape[-1] == latent_size:
            return image
        return F.interpolate(image, size=latent_size, mode="bicubic").clamp(-1, 1)
