"""Oxford-IIIT Pet datamodule on a fake copy of torchvision's layout."""

from __future__ import annotations

import pickle
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.oxford_iiit_pet as tv_pets
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm_lightning.data.captions import pet_caption
from ldm_lightning.data.pets import PetsDataModule, read_annotation
from tests.data.fake_layouts import PET_BREEDS, make_fake_pets, pet_colour, truncate_file

N_TRAINVAL, N_TEST = 10, 2
CONFIG = Path(__file__).parents[2] / "conf" / "data" / "pets.yaml"


@pytest.fixture(scope="module")
def pets_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pets")
    make_fake_pets(root, n_trainval=N_TRAINVAL, n_test=N_TEST)
    return root


def _datamodule(root: Path, **kwargs) -> PetsDataModule:
    kwargs = {"image_size": 16, "download": False, **kwargs}
    datamodule = PetsDataModule(str(root), **kwargs)
    datamodule.setup()
    return datamodule


def _ids(datamodule: PetsDataModule, split: str) -> list[str]:
    return [record.path.stem for record in datamodule.dataset(split).records]


def test_captions() -> None:
    assert pet_caption("great_pyrenees", "dog") == "a photo of a great pyrenees, a type of dog"
    assert pet_caption("Abyssinian", "cat") == "a photo of a abyssinian, a type of cat"
    with pytest.raises(ValueError, match="species"):
        pet_caption("pug", "hamster")


def test_annotation_header_lines_are_skipped(pets_root: Path) -> None:
    rows = read_annotation(pets_root / "oxford-iiit-pet" / "annotations" / "list.txt")
    assert len(rows) == 37 * (N_TRAINVAL + N_TEST)
    assert (rows[0].image_id, rows[0].class_id, rows[0].species) == ("Abyssinian_1", 1, 1)


def test_labels_species_captions_and_pixels_match_the_annotations(pets_root: Path) -> None:
    datamodule = _datamodule(pets_root)
    assert datamodule.num_classes == 37
    assert datamodule.class_names[0] == "abyssinian"
    assert datamodule.class_names[15] == "great pyrenees"
    table = {breed: (class_id, species) for breed, class_id, species, _ in PET_BREEDS}
    dataset = datamodule.dataset("test")
    for index in range(0, len(dataset), 7):
        sample = dataset[index]
        breed, number = dataset.records[index].path.stem.rsplit("_", 1)
        class_id, species = table[breed]
        assert sample["label"] == class_id - 1
        assert sample["species"] == species - 1
        assert sample["caption"] == pet_caption(breed, ("cat", "dog")[species - 1])
        expected = torch.tensor(pet_colour(class_id, int(number))) / 127.5 - 1
        assert torch.allclose(sample["image"].mean(dim=(1, 2)), expected, atol=0.04)


def test_splits_sizes_disjoint_and_stratified(pets_root: Path) -> None:
    datamodule = _datamodule(pets_root)
    train, val, test = (_ids(datamodule, split) for split in ("train", "val", "test"))
    # 370 trainval images, val = round(0.1 * 370) = 37: one per breed (quota 1.0 each)
    assert (len(train), len(val), len(test)) == (333, 37, 74)
    assert not set(train) & set(val)
    trainval = {line.split()[0] for line in
                (pets_root / "oxford-iiit-pet/annotations/trainval.txt").read_text().splitlines()}
    assert set(train) | set(val) == trainval
    assert all(int(image_id.rsplit("_", 1)[1]) > N_TRAINVAL for image_id in test)
    val_labels = [record.label for record in datamodule.dataset("val").records]
    assert sorted(val_labels) == list(range(37))


def test_splits_are_deterministic_and_follow_the_seed(pets_root: Path) -> None:
    first, second = _datamodule(pets_root), _datamodule(pets_root)
    for split in ("train", "val", "test"):
        assert _ids(first, split) == _ids(second, split)
    assert _ids(_datamodule(pets_root, seed=1), "val") != _ids(first, "val")


def test_train_crops_and_flips_at_random_val_and_test_do_not(pets_root: Path) -> None:
    datamodule = _datamodule(pets_root, image_size=24)
    train, val = datamodule.dataset("train"), datamodule.dataset("val")
    assert (train.transform.random_crop, train.transform.flip) == (True, True)
    assert (val.transform.random_crop, val.transform.flip) == (False, False)
    assert not _datamodule(pets_root, flip=False).dataset("train").transform.flip
    deterministic = datamodule.build_split("train", augment=False)
    assert (deterministic.transform.random_crop, deterministic.transform.flip) == (False, False)
    sample = val[0]
    assert sample["image"].shape == (3, 24, 24)
    assert -1.0 <= sample["image"].min() <= sample["image"].max() <= 1.0
    assert torch.equal(val[0]["image"], sample["image"])


def test_class_subset_reindexes_labels_in_the_given_order(pets_root: Path) -> None:
    datamodule = _datamodule(pets_root, classes=["great_pyrenees", "Abyssinian", "Bengal"])
    assert datamodule.num_classes == 3
    assert datamodule.class_names == ["great pyrenees", "abyssinian", "bengal"]
    expected = {"great_pyrenees": 0, "Abyssinian": 1, "Bengal": 2}
    for split, per_breed in (("train", N_TRAINVAL - 1), ("val", 1), ("test", N_TEST)):
        records = datamodule.dataset(split).records
        assert len(records) == 3 * per_breed
        for record in records:
            assert record.label == expected[record.path.stem.rsplit("_", 1)[0]]
    assert datamodule.dataset("val")[0]["species"] in (0, 1)


def test_unknown_or_repeated_breed_is_an_error_listing_valid_names(pets_root: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown .*\['poodle'\].*'beagle'"):
        _datamodule(pets_root, classes=["beagle", "poodle"])
    with pytest.raises(ValueError, match="twice"):
        PetsDataModule(str(pets_root), classes=["pug", "Pug"])


def test_incomplete_copy_without_a_class_subset_is_an_error(tmp_path: Path) -> None:
    make_fake_pets(tmp_path, breeds=("beagle", "Bengal"))
    with pytest.raises(ValueError, match=r"lacks class ids \[1, 2, 3, 4, 7,.*data\.classes"):
        _ = PetsDataModule(str(tmp_path)).class_names


def test_bad_val_fraction_is_an_error(pets_root: Path) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        PetsDataModule(str(pets_root), val_fraction=1.0)


def test_corrupt_files_are_skipped_with_a_warning_or_raise(tmp_path: Path) -> None:
    make_fake_pets(tmp_path, breeds=("beagle", "Bengal"), n_trainval=4, n_test=2, photo=True,
                   size=(48, 40))
    images = tmp_path / "oxford-iiit-pet" / "images"
    truncate_file(images / "beagle_5.jpg", keep=0.8)
    (images / "Bengal_6.jpg").write_text("<html>not found</html>")
    with pytest.warns(UserWarning, match="skipping 2 unreadable image") as caught:
        datamodule = _datamodule(tmp_path, classes=["beagle", "Bengal"])
    message = " ".join(str(warning.message) for warning in caught)
    assert "beagle_5.jpg" in message and "Bengal_6.jpg" in message
    # both broken files are test images (numbers 5-6): 4 test images minus 2; trainval intact
    assert len(datamodule.dataset("test")) == 2
    assert len(datamodule.dataset("train")) + len(datamodule.dataset("val")) == 8
    with pytest.raises(ValueError, match=r"beagle_5\.jpg"):
        _datamodule(tmp_path, classes=["beagle", "Bengal"], on_corrupt="error")


def test_missing_data_without_download_explains_what_to_do(tmp_path: Path) -> None:
    datamodule = PetsDataModule(str(tmp_path), download=False)
    with pytest.raises(FileNotFoundError, match=r"oxford-iiit-pet/images.*download=true"):
        datamodule.prepare_data()
    with pytest.raises(FileNotFoundError, match="annotations"):
        datamodule.setup()


def test_prepare_data_downloads_through_torchvision(
    tmp_path: Path, pets_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def fake_download(url: str, download_root: str, md5: str | None = None, **kwargs) -> None:
        calls.append((url, Path(download_root), md5))
        if len(calls) == 1:
            shutil.copytree(pets_root / "oxford-iiit-pet", download_root, dirs_exist_ok=True)

    monkeypatch.setattr(tv_pets, "download_and_extract_archive", fake_download)
    datamodule = PetsDataModule(str(tmp_path), image_size=16)
    datamodule.prepare_data()
    base = tmp_path / "oxford-iiit-pet"
    assert calls == [(url, base, md5) for url, md5 in tv_pets.OxfordIIITPet._RESOURCES]
    datamodule.prepare_data()
    assert len(calls) == 2  # present now: nothing fetched again
    datamodule.setup()
    assert len(datamodule.dataset("test")) == 74


def test_failed_download_explains_the_manual_route(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(url: str, *args, **kwargs) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tv_pets, "download_and_extract_archive", offline)
    with pytest.raises(RuntimeError, match=r"no network.*images\.tar\.gz.*extract both"):
        PetsDataModule(str(tmp_path)).prepare_data()


def test_hydra_config_instantiates_and_loads_a_batch(pets_root: Path) -> None:
    config = OmegaConf.create({"paths": {"data_dir": str(pets_root), "cache_dir": "unused"},
                               "data": OmegaConf.load(CONFIG)})
    config.data.merge_with({"image_size": 16, "batch_size": 4, "num_workers": 0})
    datamodule = instantiate(config.data)
    assert isinstance(datamodule, PetsDataModule) and datamodule.root == pets_root
    assert (datamodule.download, datamodule.val_fraction, datamodule.flip) == (True, 0.1, True)
    datamodule.prepare_data()
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape == (4, 3, 16, 16)
    assert batch["label"].dtype == torch.long and len(batch["caption"]) == 4
    assert batch["species"].tolist() == [
        PET_BREEDS[label][2] - 1 for label in batch["label"].tolist()
    ]


def test_dataset_pickles_for_worker_processes(pets_root: Path) -> None:
    dataset = _datamodule(pets_root).dataset("val")
    copy = pickle.loads(pickle.dumps(dataset))
    assert np.array_equal(copy[3]["image"].numpy(), dataset[3]["image"].numpy())
