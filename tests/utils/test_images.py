"""Image tensors to PNGs: grids and single images."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision

from ldm_lightning.utils.images import save_grid, save_png, to_grid, to_unit


def test_to_grid_maps_minus_one_one_to_unit_range_sqrt_n_a_row() -> None:
    images = torch.stack([torch.full((3, 4, 4), v) for v in (-1.0, 0.0, 1.0, 3.0)])
    grid = to_grid(images)
    assert grid.shape == (3, 2 + 2 * (4 + 2), 2 + 2 * (4 + 2))  # 2 x 2 with 2 px padding
    assert grid[:, 2, 2].tolist() == [0.0] * 3 and grid[:, 2, 8].tolist() == [0.5] * 3
    assert to_grid(images, nrow=4).shape[-1] == 2 + 4 * 6
    assert to_unit(images).max() == 1.0  # clamped


def test_save_grid_and_save_png_create_folders(tmp_path: Path) -> None:
    images = torch.rand(3, 3, 8, 8) * 2 - 1
    path = save_grid(images, tmp_path / "a" / "grid.png", nrow=3)
    assert torchvision.io.read_image(str(path)).shape == (3, 12, 2 + 3 * 10)
    single = save_png(to_unit(images[0]), tmp_path / "b" / "0.png")
    saved = torchvision.io.read_image(str(single)).float() / 255
    assert (saved - to_unit(images[0])).abs().max() < 1 / 255

