"""The instance folder of few-shot fine-tuning: 3-10 images, every split, drawn repeatedly."""

from __future__ import annotations

from pathlib import Path

import pytest

from ldm_lightning.data.instance import InstanceDataModule
from ldm_lightning.data.shapes import ShapeSpec, render
from ldm_lightning.utils.images import save_png


def instance_folder(root: Path, count: int = 5, size: int = 8) -> Path:
    """``count`` renders of an orange circle (a colour the shapes dataset never draws)."""
    for index in range(count):
        spec = ShapeSpec("circle", "orange", "white", 0.4 + 0.05 * index, 0.5, 0.3)
        save_png(render(spec, size), root / f"{index}.png")
    return root


def test_every_split_is_the_images_and_an_epoch_draws_each_repeats_times(tmp_path: Path) -> None:
    data = InstanceDataModule(str(instance_folder(tmp_path)), image_size=8, repeats=4,
                              batch_size=2)
    assert [len(data.dataset(split)) for split in ("train", "val", "test")] == [5, 5, 5]
    batches = list(data.train_dataloader())
    assert len(batches) == 10 and batches[0]["image"].shape == (2, 3, 8, 8)


@pytest.mark.parametrize(("count", "advice"), [(2, "add some"), (11, "pick the best")])
def test_too_few_or_too_many_images_are_refused_before_training(
    tmp_path: Path, count: int, advice: str
) -> None:
    data = InstanceDataModule(str(instance_folder(tmp_path, count)), image_size=8)
    with pytest.raises(ValueError, match=f"holds {count} images.*3 to 10.*{advice}"):
        data.prepare_data()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        InstanceDataModule(str(tmp_path / "missing")).prepare_data()
