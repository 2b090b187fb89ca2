"""The sampling library's per-batch conditions (its seeds and files: tests/test_sample.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_lightning.data.shapes import NUM_CLASSES, ShapesDataModule
from ldm_lightning.models.conditioning import ClassConditioning, NoConditioning
from ldm_lightning.sampling import batch_conditions, conditions_from_data, load_init_image
from ldm_lightning.utils.cycling import cycle_to


def test_conditions_are_cycled_then_cut_per_batch() -> None:
    batches = list(batch_conditions(5, 2, labels=[7, 8], prompts=None))
    assert batches == [{"labels": [7, 8]}, {"labels": [7, 8]}, {"labels": [7]}]
    assert list(batch_conditions(3, 2)) == [{}, {}]
    with pytest.raises(ValueError, match="empty list"):
        cycle_to([], 3)


def test_conditions_from_data_cycle_the_real_labels_batch_by_batch() -> None:
    datamodule = ShapesDataModule(image_size=8, num_train=5, num_val=2, num_test=2)
    labels = [item["label"] for item in datamodule.build_split("train", augment=False)]
    module = SimpleNamespace(conditioner=ClassConditioning(num_classes=NUM_CLASSES))
    conditions = conditions_from_data(module, datamodule, "train", batch_size=2)
    batches = [next(conditions)["labels"] for _ in range(4)]
    # The last real batch has one image, cycled to the batch size; then the data starts again.
    assert batches == [labels[:2], labels[2:4], [labels[4]] * 2, labels[:2]]
    unconditional = SimpleNamespace(conditioner=NoConditioning())
    assert next(conditions_from_data(unconditional, datamodule, "train", 2)) == {}


def wide_png(path: Path) -> tuple[Path, np.ndarray]:
    """A 40x24 PNG: green bands of 8 columns either side of a random 24x24 square."""
    middle = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    pixels = np.zeros((24, 40, 3), dtype=np.uint8)
    pixels[..., 1] = 255
    pixels[:, 8:32] = middle
    Image.fromarray(pixels).save(path)
    return path, middle


def test_an_init_image_is_centre_cropped_and_resized(tmp_path: Path) -> None:
    path, middle = wide_png(tmp_path / "wide.png")
    expected = torch.from_numpy(middle).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(load_init_image(path, 24), expected[None])  # the crop, not resampled
    small = load_init_image(path, 12)
    assert small.shape == (1, 3, 12, 12) and small.min() >= -1 and small.max() <= 1
    assert (small - torch.nn.functional.avg_pool2d(expected[None], 2)).abs().mean() < 0.15


def test_an_unreadable_init_image_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"init_image=.*notes.png cannot be read as an image "
                                         r"\(UnidentifiedImageError.*give the path of a PNG"):
        load_init_image(tmp_path / "notes.png", 16)
    with pytest.raises(ValueError, match=r"missing.png cannot be read .*\(missing file\)"):
        load_init_image(tmp_path / "missing.png", 16)
