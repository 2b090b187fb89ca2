"""Labels come from the data: num_classes and class names of a class-conditional LDM are the
datamodule's where the config leaves them null, the names travel in the checkpoint, sampling
takes names or indices and writes samples/<class name>/, and other data is a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm_lightning.data.image_folder import ImageFolderDataModule
from ldm_lightning.models import LatentDiffusionModule
from ldm_lightning.models.checkpoints import load_stage
from ldm_lightning.models.from_data import fill_from_data
from ldm_lightning.sample import run as sample
from ldm_lightning.sampling import folder_name, per_class_labels
from ldm_lightning.train import train
from tests.data.fake_layouts import make_fake_image_folder
from tests.hydra_utils import compose_config
from tests.models.test_diffusion_module import tiny_pixel_ddpm

CLASSES = {"cat": 6, "dog": 6, "red fox": 6}
TINY_PIXEL_CLASS_LDM = [
    "model=ldm",
    "model/conditioning=class",
    "model.first_stage.identity=true",
    "model.scale_factor=1.0",
    "data=image_folder",
    "data.image_size=8",
    "data.batch_size=4",
    "data.num_workers=0",
    "data.val_fraction=0.34",
    "model.unet.model_channels=8",
    "model.unet.channel_mult=[1,2]",
    "model.unet.attention_resolutions=[]",
    "model.unet.num_head_channels=8",
    "model.sampling.steps=2",
    "model.num_log_images=2",
    "trainer.max_epochs=1",
    "logger=csv",
    "test=false",
    "optimized_metric=val/loss",
]


@pytest.fixture(scope="module")
def class_ldm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_fake_image_folder(tmp_path_factory.mktemp("pets"), CLASSES)
    run = tmp_path_factory.mktemp("run")
    train(compose_config([*TINY_PIXEL_CLASS_LDM, f"data.root={root}"], run))
    return run / "checkpoints" / "last.ckpt"


def test_classes_come_from_the_folder_and_travel_in_the_checkpoint(class_ldm: Path) -> None:
    model = load_stage(LatentDiffusionModule, class_ldm, "latent_diffusion")
    assert model.conditioner.num_classes == 3
    assert model.conditioner.class_names == ["cat", "dog", "red fox"]
    assert model.hparams.conditioning["class_names"] == ["cat", "dog", "red fox"]
    by_name = model.sample(n=2, steps=2, seed=0, labels=["red fox", "cat"])
    torch.testing.assert_close(by_name, model.sample(n=2, steps=2, seed=0, labels=[2, "0"]))
    with pytest.raises(ValueError, match=r"unknown class name 'wolf'.*names: cat, dog, red fox"):
        model.sample(n=1, steps=2, labels=["wolf"])


def test_per_class_writes_one_folder_per_class(class_ldm: Path, tmp_path: Path) -> None:
    cfg = compose_config([f"ckpt_path={class_ldm}", "per_class=2", "steps=2", "device=cpu"],
                         tmp_path, config_name="sample")
    sample(cfg)
    written = sorted(p.relative_to(tmp_path / "samples").as_posix()
                     for p in (tmp_path / "samples").rglob("*.png"))
    assert written == [f"{name}/{i:05d}.png" for name in CLASSES for i in range(2)]
    chosen = tmp_path / "chosen"
    sample(compose_config([f"ckpt_path={class_ldm}", "per_class=1", "labels=[dog]", "steps=2",
                           "device=cpu"], chosen, config_name="sample"))
    assert [p.parent.name for p in (chosen / "samples").rglob("*.png")] == ["dog"]


def test_data_with_other_classes_is_refused(class_ldm: Path, tmp_path: Path) -> None:
    model = load_stage(LatentDiffusionModule, class_ldm, "latent_diffusion")
    other = ImageFolderDataModule(str(make_fake_image_folder(tmp_path / "a", {"cat": 2,
                                                                             "dog": 2})))
    with pytest.raises(ValueError, match=r"3 classes \(cat, dog, red fox\) are not the data's 2"):
        model.adopt_data(other)
    renamed = make_fake_image_folder(tmp_path / "b", {"ant": 2, "bee": 2, "cow": 2})
    with pytest.raises(ValueError, match=r"are not the data's 3 \(ant, bee, cow\)"):
        model.adopt_data(ImageFolderDataModule(str(renamed)))


def test_a_flat_folder_has_no_labels_for_a_class_model(tmp_path: Path) -> None:
    flat = make_fake_image_folder(tmp_path / "flat")
    cfg = compose_config([*TINY_PIXEL_CLASS_LDM, f"data.root={flat}"], tmp_path)
    with pytest.raises(ValueError, match=r"needs labelled data.*one sub-folder per class"):
        fill_from_data(cfg.model, ImageFolderDataModule(str(flat)))


def test_a_given_num_classes_is_kept_and_the_class_encoder_is_filled(tmp_path: Path) -> None:
    root = make_fake_image_folder(tmp_path / "f", CLASSES)
    data = ImageFolderDataModule(str(root))
    cfg = compose_config([*TINY_PIXEL_CLASS_LDM, f"data.root={root}",
                          "model.conditioning.num_classes=3"], tmp_path)
    assert fill_from_data(cfg.model, data).conditioning.num_classes == 3
    clip = compose_config(["model=conditioner_class", "data=image_folder",
                           f"data.root={root}"], tmp_path)
    assert clip.model.encoder.num_classes is None
    assert fill_from_data(clip.model, data).encoder.num_classes == 3


@pytest.mark.parametrize(("name", "folder"), [("red fox", "red fox"), ("a/b", "a_b"),
                                              (".hidden", "_hidden"), ("", "_")])
def test_folder_names_are_one_path_component(name: str, folder: str) -> None:
    assert folder_name(name) == folder


def test_per_class_needs_a_class_model_and_a_positive_count(class_ldm: Path) -> None:
    with pytest.raises(ValueError, match=r"per_class needs a class-conditional checkpoint"):
        per_class_labels(tiny_pixel_ddpm(), 2)
    model = load_stage(LatentDiffusionModule, class_ldm, "latent_diffusion")
    with pytest.raises(ValueError, match=r"per_class must be at least 1, got 0"):
        per_class_labels(model, 0)
    assert per_class_labels(model, 2, ["dog"]) == ([1, 1], ["dog", "dog"])
