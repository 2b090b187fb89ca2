"""Image tensors to PNG files: one sample, or a grid of them.

Images in the package are ``[N, 3, H, W]`` floats in [-1, 1]; PNGs hold [0, 1] scaled to 8 bits.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torchvision

__all__ = ["save_grid", "save_png", "to_grid", "to_unit"]


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """``[..., 3, H, W]`` in [-1, 1] -> the same in [0, 1] (float, on the CPU, detached)."""
    return (images.detach().float().cpu().clamp(-1, 1) + 1) / 2


def to_grid(images: torch.Tensor, nrow: int | None = None) -> torch.Tensor:
    """``[N, 3, H, W]`` in [-1, 1] -> one ``[3, H', W']`` grid in [0, 1], ``nrow`` images a row
    (default ``sqrt(N)``)."""
    nrow = nrow or max(1, int(math.sqrt(images.shape[0])))
    return torchvision.utils.make_grid(to_unit(images), nrow=nrow, padding=2, pad_value=1.0)


def save_png(image: torch.Tensor, path: str | Path) -> Path:
    """Write ``image`` (``[3, H, W]`` in [0, 1]) as a PNG, creating its folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torchvision.utils.save_image(image, path)
    return path


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write ``images`` (``[N, 3, H, W]`` in [-1, 1]) as one PNG grid; returns the path."""
    return save_png(to_grid(images, nrow), path)
