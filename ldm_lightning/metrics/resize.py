"""Images brought to a feature extractor's input size the way an evaluation protocol fixes it.

A resize filter changes FID by more than many papers' improvements (Parmar et al. 2022,
"On Aliased Resizing and Surprising Subtleties in GAN Evaluation"), so it is part of the
protocol and recorded with every number. :class:`Resized` wraps an extractor that declares an
``input_size``: images in [0, 1] are quantised to 8 bits first (as if saved as PNGs, torchmetrics'
and torch-fidelity's convention), then resized with the protocol's filter:

- ``bicubic``: antialiased bicubic (PIL's filter, which Stein et al. 2023 use for DINOv2 and
  clean-fid for Inception);
- ``bilinear``: antialiased bilinear;
- ``tf1_bilinear``: TensorFlow 1's bilinear (torch-fidelity's, for its Inception and DINOv2).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

__all__ = ["FILTERS", "Resized", "resize_images"]

FILTERS = ("bicubic", "bilinear", "tf1_bilinear")


def resize_images(images: Tensor, size: int, filter: str) -> Tensor:
    """``images [B, C, H, W]`` (float) -> ``[B, C, size, size]`` with ``filter`` (see module)."""
    if filter not in FILTERS:
        raise ValueError(f"resize filter {filter!r} is unknown; choose one of {list(FILTERS)}")
    if images.shape[-2:] == (size, size):
        return images
    if filter == "tf1_bilinear":
        return interpolate_bilinear_2d_like_tensorflow1x(images, (size, size), align_corners=False)
    return F.interpolate(images, (size, size), mode=filter, align_corners=False, antialias=True)


class Resized(nn.Module):
    """``net`` fed 8-bit-quantised images resized to ``net.input_size`` with ``filter``.

    ``forward(images [B, 3, H, W] in [0, 1])`` returns what ``net`` returns for
    ``[B, 3, S, S]`` in [0, 1]. The size and the filter are part of its identity
    (:func:`~ldm_lightning.metrics.fid.extractor_identity`), so real features cached with
    another filter are never reused.
    """

    def __init__(self, net: nn.Module, filter: str) -> None:
        super().__init__()
        if filter not in FILTERS:
            raise ValueError(f"resize={filter!r} is unknown; choose one of {list(FILTERS)}")
        self.net = net
        self.input_size = int(net.input_size)
        self.resize = filter

    def forward(self, images: Tensor) -> Tensor | tuple[Tensor, ...]:
        pixels = (images.clamp(0, 1) * 255).byte().float()
        resized = resize_images(pixels, self.input_size, self.resize).clamp(0, 255)
        return self.net(resized / 255)
