"""CelebA-HQ datamodule on fake CelebAMask-HQ and plain-folder copies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm_lightning.data.captions import celeba_caption
from ldm_lightning.data.celebahq import CelebAHQDataModule, read_attributes
from tests.data.fake_layouts import CELEBA_ATTRIBUTES, face_colour, make_fake_celebahq

N = 12
CONFIG = Path(__file__).parents[2] / "conf" / "data" / "celebahq.yaml"
MALE = CELEBA_ATTRIBUTES.index("Male")


@pytest.fixture(scope="module")
def mask_hq(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[int, ...]]]:
    root = tmp_path_factory.mktemp("data") / "celebahq"
    return root, make_fake_celebahq(root, n=N, size=20)


def _datamodule(root: Path, **kwargs) -> CelebAHQDataModule:
    datamodule = CelebAHQDataModule(str(root), **{"image_size": 16, "num_train": 9, **kwargs})
    datamodule.setup()
    return datamodule


@pytest.mark.parametrize(
    ("attrs", "caption"),
    [
        ({"Smiling": True, "Blond_Hair": True, "Eyeglasses": True},
         "a smiling woman with blond hair and eyeglasses"),
        ({}, "a woman"),
        ({"Male": True, "Young": False, "Gray_Hair": True, "No_Beard": False},
         "a old man with gray hair and a beard"),
        ({"Male": True, "Bald": True, "Black_Hair": True, "Mustache": True, "Wearing_Hat": True},
         "a bald man with a mustache and a hat"),
        ({"Wavy_Hair": True, "Brown_Hair": True, "Black_Hair": True, "Bangs": True},
         "a woman with wavy black hair and bangs"),
        ({"Straight_Hair": True, "Smiling": True, "Male": True, "No_Beard": True},
         "a smiling man with straight hair"),
    ],
)
def test_caption_template(attrs: dict[str, bool], caption: str) -> None:
    assert celeba_caption(attrs) == caption


def test_attribute_file_in_the_release_format_is_parsed(mask_hq) -> None:
    root, attributes = mask_hq
    path = root / "CelebAMask-HQ" / "CelebAMask-HQ-attribute-anno.txt"
    assert path.read_text().splitlines()[2].startswith("0.jpg  ")
    names, rows = read_attributes(path)
    assert names == list(CELEBA_ATTRIBUTES)
    assert rows["3.jpg"] == tuple((v + 1) // 2 for v in attributes[3])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda lines: ["29", *lines[1:]], "announces 29 images but 12"),
        (lambda lines: [*lines[:3], lines[3].rsplit(" ", 1)[0], *lines[4:]], ":4: expected"),
        (lambda lines: [*lines[:2], lines[2].replace(" -1", " 0", 1), *lines[3:]], ":3: expected"),
        (lambda lines: [lines[0], lines[1].rsplit(" ", 2)[0], *lines[2:]], ":2: expected 40"),
        (lambda lines: lines[1:], "line 1 must be the image count"),
    ],
)
def test_malformed_attribute_file_names_the_line(tmp_path: Path, edit, message: str) -> None:
    make_fake_celebahq(tmp_path, n=N, size=8)
    path = tmp_path / "CelebAMask-HQ" / "CelebAMask-HQ-attribute-anno.txt"
    path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")
    with pytest.raises(ValueError, match=message):
        read_attributes(path)


def test_samples_carry_attributes_label_caption_and_the_right_image(mask_hq) -> None:
    root, attributes = mask_hq
    datamodule = _datamodule(root)
    assert datamodule.num_classes == 2
    for split, ids in (("train", range(9)), ("val", range(9, N))):
        dataset = datamodule.dataset(split)
        assert [record.path.name for record in dataset.records] == [f"{i}.jpg" for i in ids]
        for position, index in enumerate(ids):
            sample = dataset[position]
            bits = torch.tensor([(v + 1) // 2 for v in attributes[index]])
            assert torch.equal(sample["attributes"], bits)
            assert sample["label"] == bits[MALE].item()
            named = {name: bool(bit) for name, bit in zip(CELEBA_ATTRIBUTES, bits.tolist())}
            assert sample["caption"] == celeba_caption(named)
            colour = torch.tensor(face_colour(index)) / 127.5 - 1
            assert torch.allclose(sample["image"].mean(dim=(1, 2)), colour, atol=0.04)


def test_test_split_is_the_validation_split_and_splits_are_deterministic(mask_hq) -> None:
    first, second = _datamodule(mask_hq[0]), _datamodule(mask_hq[0])
    assert first.dataset("test").records == first.dataset("val").records
    for split in ("train", "val"):
        assert first.dataset(split).records == second.dataset(split).records
    assert len(_datamodule(mask_hq[0], num_train=4).dataset("val")) == N - 4


def test_label_attribute_is_configurable_and_checked(mask_hq) -> None:
    root, attributes = mask_hq
    smiling = CELEBA_ATTRIBUTES.index("Smiling")
    dataset = _datamodule(root, label_attribute="Smiling").dataset("train")
    assert [dataset[i]["label"] for i in range(9)] == [(a[smiling] + 1) // 2
                                                        for a in attributes[:9]]
    with pytest.raises(ValueError, match=r"'Beard' is not a CelebA attribute.*'No_Beard'"):
        _datamodule(root, label_attribute="Beard")


def test_any_image_size_and_flip_on_train_only(mask_hq) -> None:
    datamodule = _datamodule(mask_hq[0], image_size=40)
    train, val = datamodule.dataset("train"), datamodule.dataset("val")
    assert train[0]["image"].shape == val[0]["image"].shape == (3, 40, 40)
    assert (train.transform.random_crop, train.transform.flip) == (False, True)
    assert (val.transform.random_crop, val.transform.flip) == (False, False)


def test_num_train_must_leave_validation_images(mask_hq) -> None:
    with pytest.raises(ValueError, match=r"num_train=12 leaves no validation.*below 12"):
        _datamodule(mask_hq[0], num_train=12)
    with pytest.raises(ValueError, match="positive"):
        CelebAHQDataModule(str(mask_hq[0]), num_train=0)


def test_plain_folder_of_faces(tmp_path: Path) -> None:
    make_fake_celebahq(tmp_path, n=N, size=20, layout="folder")
    datamodule = _datamodule(tmp_path, num_train=10)
    assert datamodule.num_classes == 0
    val = datamodule.dataset("val")
    # natural order: 0, 1, ..., 9 train; 10, 11 validate (not "10.jpg" < "2.jpg")
    assert [record.path.name for record in val.records] == ["10.jpg", "11.jpg"]
    sample = val[1]
    assert set(sample) == {"image", "label", "caption"}
    assert (sample["label"], sample["caption"]) == (0, "a photo of a face")
    assert torch.allclose(sample["image"].mean(dim=(1, 2)),
                          torch.tensor(face_colour(11)) / 127.5 - 1, atol=0.04)


def test_corrupt_images_are_skipped_or_raise(tmp_path: Path) -> None:
    make_fake_celebahq(tmp_path, n=N, size=20)
    (tmp_path / "CelebAMask-HQ" / "CelebA-HQ-img" / "3.jpg").write_text("not a jpeg")
    (tmp_path / "CelebAMask-HQ" / "CelebA-HQ-img" / "10.jpg").unlink()
    with pytest.warns(UserWarning) as caught:
        datamodule = _datamodule(tmp_path)
    message = " ".join(str(warning.message) for warning in caught)
    assert "3.jpg" in message and "10.jpg (missing file)" in message
    assert len(datamodule.dataset("train")) == 8 and len(datamodule.dataset("val")) == 2
    with pytest.raises(ValueError, match=r"3\.jpg"):
        _datamodule(tmp_path, on_corrupt="error")


def test_missing_data_gives_layout_instructions(tmp_path: Path) -> None:
    datamodule = CelebAHQDataModule(str(tmp_path / "celebahq"))
    with pytest.raises(FileNotFoundError) as error:
        datamodule.prepare_data()
    message = str(error.value)
    for needle in ("no automatic download", "switchablenorms/CelebAMask-HQ", "Google Drive",
                   "CelebAMask-HQ/CelebA-HQ-img/0.jpg ... 29999.jpg",
                   "CelebAMask-HQ/CelebAMask-HQ-attribute-anno.txt"):
        assert needle in message
    (tmp_path / "celebahq" / "CelebAMask-HQ" / "CelebA-HQ-img").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="CelebAMask-HQ-attribute-anno.txt is missing"):
        CelebAHQDataModule(str(tmp_path / "celebahq")).setup()


def test_hydra_config_instantiates(mask_hq) -> None:
    data_dir = mask_hq[0].parent
    config = OmegaConf.create({"paths": {"data_dir": str(data_dir), "cache_dir": "unused"},
                               "data": OmegaConf.load(CONFIG)})
    config.data.merge_with({"image_size": 8, "num_train": 9, "batch_size": 2, "num_workers": 0})
    datamodule = instantiate(config.data)
    assert isinstance(datamodule, CelebAHQDataModule)
    assert datamodule.root == mask_hq[0]  # root: ${paths.data_dir}/celebahq
    datamodule.setup()
    batch = next(iter(datamodule.val_dataloader()))
    assert batch["image"].shape == (2, 3, 8, 8) and batch["attributes"].shape == (2, 40)
