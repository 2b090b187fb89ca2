"""The sampling library's per-batch conditions (its seeds and files: tests/test_sample.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ldm_lightning.data.shapes import NUM_CLASSES, ShapesDataModule
from ldm_lightning.models.conditioning import ClassConditioning, NoConditioning
from ldm_lightning.sampling import batch_conditions, conditions_from_data
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
