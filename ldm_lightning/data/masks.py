"""Random inpainting masks: boxes and free-form strokes (LDM sec. 4.5; LaMa's mask recipe).

A mask is ``[n, 1, size, size]`` float in {0, 1}, **1 where the image is to be filled**. Half of
the masks are one axis-aligned box with sides between 1/4 and 3/4 of the image; the other half
free-form strokes, as LDM's inpainting model is trained on (Rombach et al. 2022 sec. 4.5, after
Suvorov et al. 2022, "LaMa", sec. 3): 1-3 polylines of 1-4 segments each, every segment a
capsule of width 1/10 to 1/5 of the image around a random line. Drawn from ``generator`` only,
so a seed gives the same masks on every machine.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["box_mask", "random_masks", "stroke_mask"]


def _uniform(generator: torch.Generator | None, low: float, high: float, *shape: int) -> Tensor:
    return low + (high - low) * torch.rand(shape or (1,), generator=generator)


def box_mask(size: int, generator: torch.Generator | None = None) -> Tensor:
    """One box of sides in [size/4, 3 size/4] at a random place, ``[size, size]``."""
    height, width = (int(v) for v in _uniform(generator, size / 4, 3 * size / 4 + 1, 2))
    top = int(torch.randint(size - height + 1, (), generator=generator))
    left = int(torch.randint(size - width + 1, (), generator=generator))
    mask = torch.zeros(size, size)
    mask[top : top + height, left : left + width] = 1.0
    return mask


def stroke_mask(size: int, generator: torch.Generator | None = None) -> Tensor:
    """1-3 free-form strokes, ``[size, size]``: a pixel is in a segment a->b of width w when
    its distance to the segment, ``|p - (a + clamp((p-a).(b-a) / |b-a|^2, 0, 1) (b-a))|``, is at
    most w / 2 (all lengths in pixels)."""
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    points = torch.stack(torch.meshgrid(coords, coords, indexing="ij"), -1)  # [H, W, 2] (y, x)
    mask = torch.zeros(size, size, dtype=torch.bool)
    for _ in range(int(torch.randint(1, 4, (), generator=generator))):
        start = _uniform(generator, 0, size, 2)
        width = float(_uniform(generator, size / 10, size / 5))
        for _ in range(int(torch.randint(1, 5, (), generator=generator))):
            end = (start + _uniform(generator, -size / 2, size / 2, 2)).clamp(0, size)
            direction = end - start
            along = ((points - start) @ direction / direction.dot(direction).clamp(min=1e-6))
            nearest = start + along.clamp(0, 1)[..., None] * direction
            mask |= (points - nearest).norm(dim=-1) <= width / 2
            start = end
    return mask.float()


def random_masks(n: int, size: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` masks ``[n, 1, size, size]``, each a box or strokes with probability 1/2."""
    masks = [
        box_mask(size, generator) if torch.rand((), generator=generator) < 0.5
        else stroke_mask(size, generator)
        for _ in range(n)
    ]
    return torch.stack(masks)[:, None]
