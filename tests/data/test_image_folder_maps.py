"""Semantic maps beside an image folder (``data.segmentation_dir``): each item's map follows its
image through the same crop and flip, and a missing, misplaced or wrong-mode map is refused
with the fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_lightning.data.image_folder import ImageFolderDataModule
from tests.data.fake_layouts import make_fake_image_folder, write_semantic_maps


def _folder(tmp_path: Path) -> tuple[Path, Path]:
    root = make_fake_image_folder(tmp_path / "images", {"cat": 4, "dog": 4}, size=(24, 16))
    return root, write_semantic_maps(root, tmp_path / "maps")


def test_each_map_follows_its_image_through_the_random_crop_and_flip(tmp_path: Path) -> None:
    root, maps = _folder(tmp_path)
    data = ImageFolderDataModule(str(root), image_size=16, segmentation_dir=str(maps),
                                 val_fraction=0.25)
    data.setup()
    train = data.dataset("train")
    torch.manual_seed(0)
    boundaries = set()
    for _ in range(12):
        item = train[0]
        segmentation, image = item["segmentation"], item["image"]
        assert segmentation.dtype == torch.long and segmentation.shape == (16, 16)
        # Blue pixels are class 1, red ones class 0, wherever the crop and the flip put them.
        assert torch.equal(segmentation == 1, image[2] > image[0])
        row = segmentation[0].tolist()
        boundaries.add((row[0], row.count(1)))  # which side class 1 is on, and how wide
    assert {side for side, _ in boundaries} == {0, 1}  # flipped and not
    assert len({width for _, width in boundaries}) > 1  # cropped at different offsets
    # Validation: the centre crop, unflipped, every time.
    val = data.dataset("val")[0]["segmentation"]
    assert torch.equal(val, data.dataset("val")[0]["segmentation"]) and val[0, 0] == 0


def test_missing_misplaced_and_wrong_mode_maps_are_refused_with_the_fix(tmp_path: Path) -> None:
    root, maps = _folder(tmp_path)
    (maps / "dog" / "3.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 8 images have no semantic map.*dog/3\.png"
                       r".*needs a map .*/<path>\.png"):
        ImageFolderDataModule(str(root), segmentation_dir=str(maps)).prepare_data()
    with pytest.raises(ValueError, match="inside data.root.*move the maps out"):
        ImageFolderDataModule(str(root), segmentation_dir=str(root / "maps"))
    Image.new("RGB", (24, 16)).save(maps / "dog" / "3.png")
    data = ImageFolderDataModule(str(root), image_size=8, segmentation_dir=str(maps),
                                 val_fraction=0.5)
    data.setup()
    dataset = next(data.dataset(split) for split in ("train", "val")
                   if root / "dog" / "3.png" in [r.path for r in data.dataset(split).records])
    index = [r.path for r in dataset.records].index(root / "dog" / "3.png")
    with pytest.raises(ValueError, match=r"mode RGB; save maps as one-channel.*grey or palette"):
        dataset[index]
    Image.new("L", (12, 8)).save(maps / "dog" / "3.png")
    with pytest.raises(ValueError, match=r"semantic map is 12x8 but its image 24x16"):
        dataset[index]


def test_a_map_edited_in_place_changes_the_cache_key(tmp_path: Path) -> None:
    root, maps = _folder(tmp_path)
    before = ImageFolderDataModule(str(root), segmentation_dir=str(maps)).transform_signature()
    labels = np.zeros((16, 24), dtype=np.uint8)
    Image.fromarray(labels, "L").save(maps / "cat" / "0.png")
    after = ImageFolderDataModule(str(root), segmentation_dir=str(maps)).transform_signature()
    assert before["listing"] != after["listing"]
    plain = ImageFolderDataModule(str(root)).transform_signature()
    assert plain["listing"] != after["listing"] and plain["segmentation_dir"] is None


def test_jpeg_images_are_decoded_at_full_size_for_their_maps(tmp_path: Path) -> None:
    root, maps = tmp_path / "images", tmp_path / "maps"
    root.mkdir()
    pixels = np.zeros((48, 64, 3), dtype=np.uint8)
    pixels[:, 32:] = (0, 0, 255)
    pixels[:, :32] = (255, 0, 0)
    for i in range(4):
        Image.fromarray(pixels).save(root / f"{i}.jpg", quality=95)
    maps.mkdir()
    for i in range(4):
        Image.fromarray((pixels[..., 2] > 0).astype(np.uint8), "L").save(maps / f"{i}.png")
    data = ImageFolderDataModule(str(root), image_size=16, segmentation_dir=str(maps),
                                 val_fraction=0.25, random_crop=False, flip=False)
    data.setup()
    item = data.dataset("val")[0]
    # A draft decode at 16 px would have given 32x24 pixels against a 64x48 map.
    assert item["segmentation"].shape == (16, 16)
    assert torch.equal(item["segmentation"] == 1, item["image"][2] > item["image"][0])


def test_folder_semantic_without_maps_names_the_missing_setting(tmp_path: Path) -> None:
    from ldm_lightning.train import train
    from tests.hydra_utils import compose_config
    from tests.test_experiment_matrix import ON_THIS_MACHINE, TINY

    root, _ = _folder(tmp_path)
    cfg = compose_config(["+experiment=folder_semantic", f"data.root={root}",
                          "data.val_fraction=0.25", *ON_THIS_MACHINE, *TINY["semantic"],
                          "model.first_stage.identity=true"], tmp_path)
    with pytest.raises(ValueError, match=r"model/spatial=semantic builds its condition from the "
                       r"batch's 'segmentation'.*data.segmentation_dir=<maps>"):
        train(cfg)


def test_the_shapes_folder_script_writes_images_and_maps_the_folder_reads_back(
    tmp_path: Path,
) -> None:
    import importlib.util

    from ldm_lightning.data.shapes import ShapesDataset

    script = Path(__file__).parents[2] / "experiments" / "make_shapes_folder.py"
    spec = importlib.util.spec_from_file_location("make_shapes_folder", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    images, maps = module.write_folder(tmp_path, count=12, size=16)
    data = ImageFolderDataModule(str(images), image_size=16, segmentation_dir=str(maps),
                                 val_fraction=0.25, flip=False, random_crop=False)
    data.setup()
    shapes = ShapesDataset(12, 16)
    for record_index, record in enumerate(data.dataset("train").records):
        index = int(record.path.stem)
        item, truth = data.dataset("train")[record_index], shapes[index]
        assert record.path.parent.name == data.class_names[item["label"]]
        drawn = shapes.spec(index)
        assert record.path.parent.name == f"{drawn.colour} {drawn.shape}"
        assert torch.equal(item["segmentation"], truth["segmentation"])
        assert (item["image"] - truth["image"]).abs().max() <= 1 / 127.5 + 1e-6  # 8-bit PNG


def test_palette_maps_are_read_as_their_class_indices(tmp_path: Path) -> None:
    """Segmentation datasets often ship palette PNGs: the indices count, not the colours."""
    root, maps = _folder(tmp_path)
    for path in maps.rglob("*.png"):
        palette = Image.open(path).convert("P")  # same indices 0 / 1, now a palette image
        palette.putpalette([0, 0, 0, 255, 0, 0])
        palette.save(path)
    data = ImageFolderDataModule(str(root), image_size=16, segmentation_dir=str(maps),
                                 val_fraction=0.25, random_crop=False, flip=False)
    data.setup()
    item = data.dataset("val")[0]
    assert Image.open(next(maps.rglob("*.png"))).mode == "P"
    assert set(item["segmentation"].unique().tolist()) == {0, 1}
    assert torch.equal(item["segmentation"] == 1, item["image"][2] > item["image"][0])
