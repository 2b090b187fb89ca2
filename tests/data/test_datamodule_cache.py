"""The latent cache of every datamodule: a JSON key that names where the data lives, and
cached items that are the un-augmented images, their mirror images, labels and captions.

The model here is a pixel-space DDPM (identity first stage), so a cached latent must equal its
image exactly.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm_lightning.data.base import ImageDataModule
from ldm_lightning.data.celebahq import CelebAHQDataModule
from ldm_lightning.data.image_folder import ImageFolderDataModule
from ldm_lightning.data.latent_cache import CacheKey
from ldm_lightning.data.latent_dataset import LatentDataset
from ldm_lightning.data.pets import PetsDataModule
from ldm_lightning.data.shapes import ShapesDataModule
from ldm_lightning.models import connect
from tests.data.fake_layouts import make_fake_celebahq, make_fake_image_folder, make_fake_pets
from tests.models.test_diffusion_module import tiny_pixel_ddpm
from tests.test_handshake import quiet_trainer

LOADER = {"image_size": 8, "batch_size": 2, "num_workers": 0}
BREEDS = ("Abyssinian", "beagle")
CAPTIONS = {"cat/1.png": "a cat asleep on a sofa", "dog/2.png": "a dog in the snow"}


def captioned_folder(root: Path, counts: dict[str, int] | None = None) -> Path:
    """Class folders (default: cat and dog, four images each) with ``CAPTIONS`` for two of
    the images in captions.jsonl."""
    make_fake_image_folder(root, counts or {"cat": 4, "dog": 4})
    lines = [json.dumps({"file": file, "caption": caption}) for file, caption in CAPTIONS.items()]
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def shapes(tmp_path: Path, **kwargs) -> ImageDataModule:
    return ShapesDataModule(num_train=8, num_val=4, num_test=4, **LOADER, **kwargs)


def image_folder(tmp_path: Path, **kwargs) -> ImageDataModule:
    root = captioned_folder(tmp_path / "folder")
    return ImageFolderDataModule(str(root), val_fraction=0.25, **LOADER, **kwargs)


def pets(tmp_path: Path, **kwargs) -> ImageDataModule:
    make_fake_pets(tmp_path, breeds=BREEDS)
    return PetsDataModule(str(tmp_path), download=False, classes=list(BREEDS), **LOADER, **kwargs)


def celebahq(tmp_path: Path, **kwargs) -> ImageDataModule:
    make_fake_celebahq(tmp_path / "celebahq", n=8)
    return CelebAHQDataModule(str(tmp_path / "celebahq"), num_train=6, **LOADER, **kwargs)


DATAMODULES: dict[str, Callable[..., ImageDataModule]] = {
    "shapes": shapes, "image_folder": image_folder, "pets": pets, "celebahq": celebahq,
}


@pytest.mark.parametrize("kind", DATAMODULES)
def test_signature_is_json_and_does_not_change_when_the_data_is_read(
    kind: str, tmp_path: Path
) -> None:
    data = DATAMODULES[kind](tmp_path)
    before = data.transform_signature()
    data.prepare_data()
    data.setup()
    assert data.transform_signature() == before
    assert json.loads(json.dumps(before)) == before
    CacheKey(autoencoder_hash="ae", dataset=data.name, split="train", transforms=before)


def test_signature_holds_the_resolved_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two folders of the same name in different places are different data."""
    for place in ("a", "b"):
        captioned_folder(tmp_path / place / "photos")
    monkeypatch.chdir(tmp_path)
    here = ImageFolderDataModule("a/photos").transform_signature()
    assert here["root"] == str((tmp_path / "a" / "photos").resolve())
    assert here != ImageFolderDataModule("b/photos").transform_signature()


@pytest.mark.parametrize(
    ("kind", "flip"),
    [("image_folder", True), ("image_folder", False), ("pets", True), ("celebahq", True)],
)
def test_cache_holds_the_images_their_mirrors_labels_and_captions(
    kind: str, flip: bool, tmp_path: Path
) -> None:
    data = DATAMODULES[kind](tmp_path, flip=flip, cache_latents=True,
                             cache_dir=str(tmp_path / "cache"))
    model = tiny_pixel_ddpm(image_size=8, num_log_images=2)
    connect(model, data)
    quiet_trainer(limit_val_batches=1).validate(model, data)
    for split in ("train", "val"):
        cached, plain = data.dataset(split), data.build_split(split, augment=False)
        assert isinstance(cached, LatentDataset)
        items = [plain[i] for i in range(len(plain))]
        images = torch.stack([item["image"] for item in items])
        torch.testing.assert_close(cached.cache.read("latents"), images)
        if split == "train" and flip:
            torch.testing.assert_close(cached.cache.read("latents_flipped"), images.flip(-1))
        else:
            assert not cached.cache.has_flipped
        assert cached.cache.read("labels").tolist() == [item["label"] for item in items]
        assert cached.captions() == [item["caption"] for item in items]
    if kind == "image_folder":
        cached_captions = data.captions("train") + data.captions("val")
        assert set(CAPTIONS.values()) <= set(cached_captions)


def test_a_changed_folder_gets_a_new_cache_key(tmp_path: Path) -> None:
    """Images added, replaced or recaptioned in the same folder are new data: the old latents
    (and captions) must not be reused."""
    root = captioned_folder(tmp_path / "photos")

    def signature() -> dict:
        return ImageFolderDataModule(str(root)).transform_signature()

    first = signature()
    assert signature() == first  # nothing changed: the same key
    image = sorted(root.rglob("*.png"))[0]
    Image.new("RGB", (12, 12), (255, 0, 0)).save(image)  # replaced in place
    replaced = signature()
    assert replaced != first
    Image.new("RGB", (12, 12), (0, 255, 0)).save(image.with_name("added.png"))
    added = signature()
    assert added not in (first, replaced)
    captions = root / "captions.jsonl"
    entry = {"file": image.relative_to(root).as_posix(), "caption": "a new caption"}
    captions.write_text(json.dumps(entry) + "\n")
    assert signature() not in (first, replaced, added)
