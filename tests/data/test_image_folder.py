"""Image-folder datamodule: layouts, captions, stratified seeded splits, colour modes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from ldm_lightning.data.captions import class_caption, readable_name
from ldm_lightning.data.image_folder import ImageFolderDataModule, stratified_split
from ldm_lightning.data.image_io import ImageRecordDataset
from ldm_lightning.data.transforms import ResizeCrop
from tests.data.fake_layouts import make_fake_image_folder

CONFIG = Path(__file__).parents[2] / "conf" / "data" / "image_folder.yaml"


def _datamodule(root: Path, **kwargs) -> ImageFolderDataModule:
    datamodule = ImageFolderDataModule(str(root), **{"image_size": 8, **kwargs})
    datamodule.setup()
    return datamodule


def _files(datamodule: ImageFolderDataModule, split: str) -> list[str]:
    return [record.path.relative_to(datamodule.root).as_posix()
            for record in datamodule.dataset(split).records]


def test_readable_names_and_class_captions() -> None:
    assert readable_name("Golden_Retriever") == "golden retriever"
    assert readable_name(" tabby-cat ") == "tabby cat"
    assert class_caption("great_pyrenees") == "a photo of a great pyrenees"
    with pytest.raises(ValueError, match="no letters"):
        readable_name("__")


def test_stratified_split_by_hand() -> None:
    labels = [0] * 7 + [1] * 3
    rest, part = stratified_split(labels, (0.2,), seed=0)
    # 2 in all; quotas 1.4 and 0.6 -> floors 1, 0 -> the spare goes to the larger remainder
    assert len(part) == 2 and sorted(labels[i] for i in part) == [0, 1]
    assert sorted(rest + part) == list(range(10))
    assert stratified_split(labels, (0.2,), seed=0) == [rest, part]
    draws = {tuple(stratified_split(labels, (0.2,), seed=s)[1]) for s in range(10)}
    assert len(draws) > 3


def test_stratified_split_three_ways_keeps_the_label_mix() -> None:
    labels = [0] * 50 + [1] * 30 + [2] * 20
    train, val, test = stratified_split(labels, (0.1, 0.2), seed=3)
    assert (len(train), len(val), len(test)) == (70, 10, 20)
    assert np.bincount([labels[i] for i in val]).tolist() == [5, 3, 2]
    assert np.bincount([labels[i] for i in test]).tolist() == [10, 6, 4]
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))


def test_class_folders_labels_captions_and_pixels(tmp_path: Path) -> None:
    make_fake_image_folder(tmp_path, {"dog": 4, "Golden_Retriever": 5, "cat": 3})
    datamodule = _datamodule(tmp_path, val_fraction=0.25)
    assert datamodule.class_names == ["Golden_Retriever", "cat", "dog"]  # sorted names
    assert datamodule.num_classes == 3
    records = datamodule.records
    assert len(records) == 12
    dataset = datamodule.build_split("val", augment=False)
    for index, record in enumerate(dataset.records):
        name = record.path.parent.name
        assert record.label == datamodule.class_names.index(name)
        sample = dataset[index]
        assert sample["caption"] == class_caption(name)
        colour = torch.tensor([20 * record.label, 10 * int(record.path.stem), 50]) / 127.5 - 1
        assert torch.allclose(sample["image"].mean(dim=(1, 2)), colour, atol=1e-6)


def test_splits_are_stratified_disjoint_and_deterministic(tmp_path: Path) -> None:
    make_fake_image_folder(tmp_path, {"a": 10, "b": 10}, size=(6, 6))
    first = _datamodule(tmp_path, val_fraction=0.1, test_fraction=0.2)
    train, val, test = (_files(first, split) for split in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (14, 2, 4)
    assert [name.split("/")[0] for name in sorted(val)] == ["a", "b"]
    assert len(set(train) | set(val) | set(test)) == 20
    second = _datamodule(tmp_path, val_fraction=0.1, test_fraction=0.2)
    assert all(_files(first, s) == _files(second, s) for s in ("train", "val", "test"))
    only_val = _datamodule(tmp_path, val_fraction=0.1)
    assert _files(only_val, "test") == _files(only_val, "val")


def test_flat_folder_is_one_unlabelled_class(tmp_path: Path) -> None:
    make_fake_image_folder(tmp_path)
    (tmp_path / "notes.txt").write_text("ignored: not an image extension")
    (tmp_path / ".hidden.png").write_text("ignored: hidden")
    datamodule = _datamodule(tmp_path, val_fraction=0.5)
    assert datamodule.num_classes == 0 and len(datamodule.records) == 6
    sample = datamodule.dataset("train")[0]
    assert (sample["label"], sample["caption"]) == (0, "a photo")


def test_captions_file_overrides_the_default(tmp_path: Path) -> None:
    make_fake_image_folder(tmp_path, {"cat": 2, "dog": 2})
    lines = [{"file": "cat/1.png", "caption": "a cat asleep on a sofa"},
             {"file": "./dog/0.png", "caption": "a dog in the snow"}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    captions = {record.path.relative_to(tmp_path).as_posix(): record.caption
                for record in ImageFolderDataModule(str(tmp_path)).records}
    assert captions == {"cat/0.png": "a photo of a cat", "cat/1.png": "a cat asleep on a sofa",
                        "dog/0.png": "a dog in the snow", "dog/1.png": "a photo of a dog"}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"file": "cat/9.png", "caption": "x"}', r"captions.jsonl:2: 'cat/9.png' is not an image"),
        ('{"file": "cat/0.png"}', r"captions.jsonl:2: expected"),
        ("not json", r"captions.jsonl:2: expected"),
        ('{"file": "cat/0.png", "caption": 3}', r"captions.jsonl:2: expected"),
        ('{"file": "cat/1.png", "caption": "again"}', r"captions.jsonl:2: a second caption"),
    ],
)
def test_bad_captions_file_names_the_line(tmp_path: Path, line: str, message: str) -> None:
    make_fake_image_folder(tmp_path, {"cat": 2})
    first = json.dumps({"file": "cat/1.png", "caption": "ok"})
    (tmp_path / "captions.jsonl").write_text(first + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        ImageFolderDataModule(str(tmp_path)).prepare_data()


def test_grayscale_rgba_and_palette_images_become_rgb(tmp_path: Path) -> None:
    (tmp_path / "modes").mkdir()
    Image.new("L", (8, 8), 102).save(tmp_path / "modes" / "gray.png")
    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).save(tmp_path / "modes" / "rgba.png")
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 51, 102, 153] + [0] * 762)
    palette.save(tmp_path / "modes" / "palette.png")
    records = ImageFolderDataModule(str(tmp_path)).records
    dataset = ImageRecordDataset(records, ResizeCrop(4))
    means = {record.path.stem: dataset[i]["image"].mean(dim=(1, 2))
             for i, record in enumerate(records)}
    assert torch.allclose(means["gray"], torch.full((3,), 102 / 127.5 - 1), atol=1e-6)
    assert torch.allclose(means["rgba"], torch.ones(3), atol=1e-6)  # transparent -> white
    assert torch.allclose(means["palette"], torch.tensor([51, 102, 153]) / 127.5 - 1, atol=1e-6)


def test_layout_errors_explain_the_expected_tree(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"does not exist.*<class name>/<image>\.jpg"):
        ImageFolderDataModule(str(tmp_path / "absent")).prepare_data()
    with pytest.raises(FileNotFoundError, match="no images found"):
        ImageFolderDataModule(str(tmp_path)).prepare_data()
    make_fake_image_folder(tmp_path, {"cat": 2})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="class folder .*empty has no images"):
        ImageFolderDataModule(str(tmp_path)).prepare_data()
    (tmp_path / "empty").rmdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "stray.png")
    with pytest.raises(ValueError, match="both class folders .* and images"):
        ImageFolderDataModule(str(tmp_path)).prepare_data()


def test_bad_fractions_and_too_small_splits(tmp_path: Path) -> None:
    for kwargs in ({"val_fraction": 0.0}, {"val_fraction": 0.5, "test_fraction": 0.5},
                   {"val_fraction": 0.1, "test_fraction": -0.1}):
        with pytest.raises(ValueError, match="fraction"):
            ImageFolderDataModule(str(tmp_path), **kwargs)
    make_fake_image_folder(tmp_path, {"cat": 3})
    with pytest.raises(ValueError, match="val split of image folder .* no readable images"):
        _datamodule(tmp_path, val_fraction=0.1)


def test_hydra_config_instantiates(tmp_path: Path) -> None:
    make_fake_image_folder(tmp_path / "images", {"cat": 5, "dog": 5})
    config = OmegaConf.create({"paths": {"data_dir": str(tmp_path), "cache_dir": "unused"},
                               "data": OmegaConf.load(CONFIG)})
    config.data.merge_with({"image_size": 8, "batch_size": 3, "num_workers": 0})
    datamodule = instantiate(config.data)
    assert isinstance(datamodule, ImageFolderDataModule)
    assert datamodule.root == tmp_path / "images"
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape == (3, 3, 8, 8)
