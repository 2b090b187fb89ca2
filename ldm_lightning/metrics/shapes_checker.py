"""Read shape, colour and background back from the pixels of a ``shapes`` image.

A deterministic checker, no learned model (the conditioning benchmark's, experiments/README.md):

- background colour: the median of the one-pixel border;
- coverage ``alpha`` of each pixel: its position on the line from the background colour to
  the shape colour, where the shape colour is the median of the pixels far from the background;
- shape colour: the nearest palette colour to that median, among the dataset's six
  (``SHAPE_COLOURS``) by default, or among the ``colours`` named (``RENDER_COLOURS`` also
  holds colours the dataset never draws, e.g. a concept taught by fine-tuning);
- shape: the best of three fits. For each of circle, square and triangle, the shape with the
  observed area ``A = sum(alpha)`` and centroid (circumcentre = centroid for all three; radius
  from ``A = pi r^2``, ``2 r^2``, ``3 sqrt(3) / 4 r^2``) is rendered by the dataset's own
  ``shape_mask``; the one with the least ``sum |alpha - mask|`` wins. (A fill ratio in the
  bounding box, pi/4 vs 1 vs 1/2, misreads ~1.5% of small real shapes at 32 px: the box is
  off by a pixel.)

The IoU of the observed shape with that fit says how clean a shape is (1 for a real render,
lower when distorted or noisy), whether or not it is the asked-for one; a sample is *clean*
above :data:`CLEAN_IOU`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ldm_lightning.data.shapes import (
    BACKGROUND_COLOURS,
    COLOUR_NAMES,
    RENDER_COLOURS,
    ShapeSpec,
    describe_label,
    shape_mask,
)

__all__ = ["CLEAN_IOU", "coverage", "fit_shape", "palette", "read_image", "score_labels"]

BACKGROUNDS = torch.tensor(list(BACKGROUND_COLOURS.values()), dtype=torch.float32)
# Area of each shape of circumradius r, over r^2 (shapes.shape_mask's geometry).
AREA_OVER_R2 = {"circle": math.pi, "square": 2.0, "triangle": 3 * math.sqrt(3) / 4}
CLEAN_IOU = 0.8


def fit_shape(alpha: torch.Tensor) -> tuple[str, float]:
    """The shape whose render at ``alpha``'s area and centroid is nearest to it (L1), and the
    IoU of the two at coverage 1/2 (1 for a clean render; lower for a distorted or noisy one).

    ``alpha``: coverage ``[H, W]`` in [0, 1].
    """
    size = alpha.shape[-1]
    area = alpha.sum().item()
    if area <= 0:
        return "circle", 0.0
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    cx = (alpha.sum(0) @ coords).item() / area
    cy = (alpha.sum(1) @ coords).item() / area
    errors, masks = {}, {}
    for shape, factor in AREA_OVER_R2.items():
        radius = math.sqrt(area / factor) / size
        spec = ShapeSpec(shape, COLOUR_NAMES[0], "white", cx, cy, radius)
        masks[shape] = torch.from_numpy(shape_mask(spec, size))
        errors[shape] = (alpha - masks[shape]).abs().sum().item()
    best = min(errors, key=errors.get)
    observed, fitted = alpha > 0.5, masks[best] > 0.5
    union = (observed | fitted).sum().item()
    return best, (observed & fitted).sum().item() / union if union else 0.0


def palette(colours: Sequence[str] = COLOUR_NAMES) -> torch.Tensor:
    """The RGB values ``[K, 3]`` of shape colours named in ``RENDER_COLOURS``."""
    unknown = [name for name in colours if name not in RENDER_COLOURS]
    if unknown or not colours:
        raise ValueError(
            f"unknown shape colours {unknown or '(none given)'}; the checker reads "
            f"{tuple(RENDER_COLOURS)} (add a new one to shapes.NEW_COLOURS)"
        )
    return torch.tensor([RENDER_COLOURS[name] for name in colours], dtype=torch.float32)


def coverage(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(alpha [H, W] in [0, 1], foreground [3], background [3])`` of one image ``[3, H, W]``
    in [-1, 1], colours in 0..255 (module docstring)."""
    rgb = (image.detach().cpu().float().clamp(-1, 1) + 1) * 127.5
    pixels = rgb.flatten(1).T
    border = torch.cat([rgb[:, 0], rgb[:, -1], rgb[:, :, 0], rgb[:, :, -1]], dim=1).T
    background = border.median(dim=0).values
    distance = (pixels - background).norm(dim=1)
    far = distance > 0.5 * distance.max()
    foreground = pixels[far].median(dim=0).values if far.any() else background
    direction = foreground - background
    alpha = ((pixels - background) @ direction / direction.dot(direction).clamp(min=1e-6))
    return alpha.clamp(0, 1).view(rgb.shape[1:]), foreground, background


def read_image(
    image: torch.Tensor, colours: Sequence[str] = COLOUR_NAMES
) -> dict[str, str | float]:
    """``{"shape", "colour", "background", "iou"}`` read from one image ``[3, H, W]`` in
    [-1, 1]; ``iou`` is how well the read shape fits (:func:`fit_shape`); ``colour`` is the
    nearest of ``colours``."""
    alpha, foreground, background = coverage(image)
    shape, iou = fit_shape(alpha)
    colour = colours[(palette(colours) - foreground).norm(dim=1).argmin()]
    background_name = list(BACKGROUND_COLOURS)[(BACKGROUNDS - background).norm(dim=1).argmin()]
    return {"shape": shape, "colour": colour, "background": background_name, "iou": iou}


def score_labels(
    images: torch.Tensor,
    labels: Sequence[int] | None = None,
    clean_iou: float = CLEAN_IOU,
    colours: Sequence[str] = COLOUR_NAMES,
) -> dict[str, float]:
    """The checker's scores of samples ``[N, 3, H, W]`` in [-1, 1]:

    - ``accuracy`` (with ``labels``, image ``i`` having asked for shapes label ``labels[i]``):
      the share read as the asked-for shape and colour;
    - ``shape_iou``: the mean IoU of the read shapes with their fits;
    - ``clean``: the share with that IoU above ``clean_iou``.

    Colours are read among ``colours`` (:func:`read_image`).
    """
    if not len(images) or (labels is not None and len(images) != len(labels)):
        count = "no" if labels is None else len(labels)
        raise ValueError(f"{len(images)} images for {count} labels; give one label each")
    reads = [read_image(image, colours) for image in images]
    iou = torch.tensor([read["iou"] for read in reads])
    scores = {"shape_iou": iou.mean().item(), "clean": (iou > clean_iou).float().mean().item()}
    if labels is not None:
        asked = [describe_label(int(label)) for label in labels]
        pairs = zip(reads, asked, strict=True)
        right = sum((read["shape"], read["colour"]) == want for read, want in pairs)
        scores = {"accuracy": right / len(reads), **scores}
    return scores
