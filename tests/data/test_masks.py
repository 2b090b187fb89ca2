"""Random inpainting masks: binary, boxes of bounded sides, strokes, reproducible."""

from __future__ import annotations

import torch

from ldm_lightning.data.masks import box_mask, random_masks, stroke_mask


def test_a_box_is_one_filled_rectangle_of_sides_a_quarter_to_three_quarters() -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        mask = box_mask(32, generator)
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        height, width = len(rows), len(cols)
        assert 8 <= height <= 24 and 8 <= width <= 24
        assert mask.sum() == height * width  # filled and rectangular
        assert rows[-1] - rows[0] + 1 == height and cols[-1] - cols[0] + 1 == width


def test_strokes_are_at_least_as_wide_as_their_minimum_width() -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        mask = stroke_mask(32, generator)
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert 0 < mask.mean() < 1
        # Segments at least 3.2 px wide: no masked pixel is isolated from its 4 neighbours.
        padded = torch.nn.functional.pad(mask, (1, 1, 1, 1))
        across = padded[1:-1, :-2] + padded[1:-1, 2:] + padded[:-2, 1:-1] + padded[2:, 1:-1]
        assert (across[mask.bool()] >= 1).all()


def test_random_masks_mix_both_kinds_and_repeat_with_the_seed() -> None:
    masks = random_masks(64, 16, torch.Generator().manual_seed(3))
    assert masks.shape == (64, 1, 16, 16)
    again = random_masks(64, 16, torch.Generator().manual_seed(3))
    assert torch.equal(masks, again)
    rectangles = [
        m.sum() == m.any(0).sum() * m.any(1).sum() for m in masks[:, 0]
    ]
    assert 10 < sum(rectangles) < 54  # about half boxes (strokes are rarely a rectangle)
