"""The instance folder of few-shot fine-tuning: 3-10 images, every split, drawn repeatedly."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_lightning.data.instance import InstanceDataModule
from ldm_lightning.data.shapes import (
    BACKGROUND_COLOURS,
    COLOUR_NAMES,
    RENDER_COLOURS,
    ShapeSpec,
    render,
)
from ldm_lightning.metrics.shapes_checker import read_image
from ldm_lightning.utils.images import save_png, to_unit


def instance_folder(root: Path, count: int = 5, size: int = 8) -> Path:
    """``count`` renders of an orange circle (a colour the shapes dataset never draws)."""
    for index in range(count):
        spec = ShapeSpec("circle", "orange", "white", 0.4 + 0.05 * index, 0.5, 0.3)
        save_png(to_unit(render(spec, size)), root / f"{index}.png")
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


def test_make_shapes_concept_writes_the_colour_it_names(tmp_path: Path) -> None:
    """The images are written in [0, 1]: a [-1, 1] render written as is turned orange
    (245, 130, 20) into (235, 5, 0), a red, which no fine-tuning could then teach as orange."""
    script = Path(__file__).parents[2] / "experiments" / "make_shapes_concept.py"
    spec = importlib.util.spec_from_file_location("make_shapes_concept", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    paths = module.write_concept(tmp_path, "circle", "orange", count=3, size=32)
    for path in paths:
        pixels = np.asarray(Image.open(path).convert("RGB"))
        colours = {tuple(int(v) for v in rgb) for rgb in pixels.reshape(-1, 3)}
        assert RENDER_COLOURS["orange"] in colours  # the shape's inside, exactly
        assert any(tuple(BACKGROUND_COLOURS[name]) in colours for name in BACKGROUND_COLOURS)
        image = torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
        read = read_image(image, [*COLOUR_NAMES, "orange"])
        assert (read["colour"], read["shape"]) == ("orange", "circle")


def test_the_latent_cache_key_changes_when_an_image_is_replaced_in_place(tmp_path: Path) -> None:
    data = InstanceDataModule(str(instance_folder(tmp_path)), image_size=8)
    before = data.transform_signature()
    assert sorted(before["files"]) == [f"{i}.png" for i in range(5)]
    assert data.transform_signature() == before
    spec = ShapeSpec("square", "orange", "black", 0.5, 0.5, 0.3)
    save_png(to_unit(render(spec, 8)), tmp_path / "2.png")  # same folder, same names
    after = data.transform_signature()
    assert after != before and after["root"] == before["root"]
    assert [n for n in before["files"] if before["files"][n] != after["files"][n]] == ["2.png"]
