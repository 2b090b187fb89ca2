"""Resize-shorter-side + square crop (+ flip) -> tensor in [-1, 1], with one resampling.

``Resize(s)`` followed by ``CenterCrop(s)`` maps the square of side ``min(w, h)`` in the
source onto the ``s x s`` output. :class:`ResizeCrop` picks that square (centred, or at a
random offset along the longer side for training) and hands it to PIL's ``resize(box=...)``,
so the pixels are resampled once and only the pixels that are kept are resampled at all.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

Box = tuple[float, float, float, float]


def square_box(width: int, height: int, random_crop: bool = False) -> Box:
    """The largest square ``(left, top, right, bottom)`` inside a ``width x height`` image.

    Centred, or, with ``random_crop``, at an integer offset drawn uniformly along the longer
    side from torch's global generator (seeded per DataLoader worker).
    """
    side = min(width, height)
    if random_crop:
        left = int(torch.randint(width - side + 1, ()).item())
        top = int(torch.randint(height - side + 1, ()).item())
    else:
        left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def to_signed_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> FloatTensor [3, H, W] with ``x = pixel / 127.5 - 1`` in [-1, 1]."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode!r}; load it with load_rgb")
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return array.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class ResizeCrop:
    """RGB PIL image -> FloatTensor [3, size, size] in [-1, 1].

    Equivalent to ``Resize(size)`` (shorter side, bicubic, antialiased) then a centre or
    random ``size x size`` crop, then an optional horizontal flip with probability 1/2.
    ``size`` is also the size to ask PIL's JPEG ``draft`` for (see ``image_io.load_rgb``).
    """

    def __init__(self, size: int, random_crop: bool = False, flip: bool = False) -> None:
        if size <= 0:
            raise ValueError(f"image size must be positive, got {size}")
        self.size = size
        self.random_crop = random_crop
        self.flip = flip

    def _draw(self, width: int, height: int) -> tuple[Box, bool]:
        """The crop box and whether to flip, drawn once per image."""
        box = square_box(width, height, self.random_crop)
        return box, self.flip and bool(torch.rand(()) < 0.5)

    def _apply(self, image: Image.Image, box: Box, flip: bool, resample: int) -> Image.Image:
        image = image.resize((self.size, self.size), resample, box=box)
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image

    def __call__(self, image: Image.Image) -> torch.Tensor:
        box, flip = self._draw(image.width, image.height)
        return to_signed_tensor(self._apply(image, box, flip, Image.Resampling.BICUBIC))

    def with_map(
        self, image: Image.Image, segmentation: Image.Image
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The image as :meth:`__call__` gives it and its semantic map (one channel of class
        indices, the image's size) through the same crop and flip, resampled nearest:
        ``([3, size, size] in [-1, 1], LongTensor [size, size])``."""
        if segmentation.size != image.size:
            raise ValueError(f"the semantic map is {segmentation.width}x{segmentation.height} "
                             f"but its image {image.width}x{image.height}; they must match")
        box, flip = self._draw(image.width, image.height)
        pixels = to_signed_tensor(self._apply(image, box, flip, Image.Resampling.BICUBIC))
        labels = self._apply(segmentation, box, flip, Image.Resampling.NEAREST)
        return pixels, torch.from_numpy(np.asarray(labels, dtype=np.int64).copy())

    def __repr__(self) -> str:
        return (
            f"ResizeCrop(size={self.size}, random_crop={self.random_crop}, flip={self.flip})"
        )
