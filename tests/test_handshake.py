"""The one data<->model handshake (ldm_lightning.models.connect): what each side hands over,
and the errors of a model that was never connected."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from ldm_lightning.data.image_folder import ImageFolderDataModule
from ldm_lightning.data.latent_dataset import LatentDataset
from ldm_lightning.data.shapes import ShapesDataModule
from ldm_lightning.diffusion.latent_norm import LatentStats
from ldm_lightning.models import ConditionerModule, connect
from tests.data.fake_layouts import make_fake_image_folder
from tests.models.test_diffusion_module import tiny_pixel_ddpm


def quiet_trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False, **kwargs)


def shapes(**kwargs) -> ShapesDataModule:
    return ShapesDataModule(**{"image_size": 16, "batch_size": 4, "num_train": 8, "num_val": 4,
                               "num_test": 4, **kwargs})


def test_captions_of_every_kind_of_dataset_match_their_items(tmp_path: Path) -> None:
    data = shapes()
    for split in ("train", "val"):
        dataset = data.dataset(split)
        assert data.captions(split) == [dataset[i]["caption"] for i in range(len(dataset))]

    root = make_fake_image_folder(tmp_path / "folder", {"cat": 4, "dog": 4})
    (root / "captions.jsonl").write_text(json.dumps({"file": "cat/1.png", "caption": "a nap"}))
    folder = ImageFolderDataModule(str(root), image_size=8, batch_size=2, val_fraction=0.25)
    train = folder.dataset("train")
    assert folder.captions("train") == [train[i]["caption"] for i in range(len(train))]
    assert "a nap" in folder.captions("train") + folder.captions("val")
    assert folder.class_names == ["cat", "dog"]

    model = tiny_pixel_ddpm()
    cached = shapes(cache_latents=True, cache_dir=str(tmp_path / "cache"))
    connect(model, cached)
    quiet_trainer(max_steps=1, limit_val_batches=0).fit(model, cached)
    assert isinstance(cached.dataset("train"), LatentDataset)
    assert cached.captions("train") == shapes().captions("train")


def test_shapes_class_names_follow_the_labels() -> None:
    names = shapes().class_names
    assert len(names) == shapes().num_classes == 18
    dataset = shapes().dataset("train")
    for i in range(len(dataset)):
        item = dataset[i]
        assert item["caption"].startswith(f"a {names[item['label']]} on"), item["caption"]


def test_latent_stats_are_those_of_the_encoded_training_batches() -> None:
    model = tiny_pixel_ddpm(scale_factor=None)
    data = shapes(batch_size=2)
    connect(model, data)
    images = torch.stack([item["image"] for item in data.dataset("train")])
    expected = LatentStats.of([images])  # identity first stage: the latents are the pixels
    stats = data.latent_stats(4)  # 4 shuffled batches of 2: every training image once
    assert stats.count == expected.count == 8 * 16 * 16
    torch.testing.assert_close(stats.mean(), expected.mean())
    torch.testing.assert_close(stats.std(), expected.std())
    quiet_trainer(max_steps=1, limit_val_batches=0).fit(model, data)
    assert model.scale_factor == pytest.approx(data.latent_stats(4).inverse_std())


def test_an_unconnected_model_says_to_connect() -> None:
    model = tiny_pixel_ddpm(scale_factor=None)
    with pytest.raises(RuntimeError, match=r"latent scale factor.*connect\(model, datamodule\)"):
        quiet_trainer(max_steps=1, limit_val_batches=0).fit(model, shapes())

    conditioner = ConditionerModule(encoder="text", width=16, first_stage={"identity": True},
                                    text={"vocab_size": 300, "context_length": 8, "layers": 1,
                                          "heads": 2}, image_encoder={"channels": [8]},
                                    embed_dim=8)
    with pytest.raises(RuntimeError, match=r"tokenizer.*connect\(model, datamodule\)"):
        quiet_trainer(max_steps=1, limit_val_batches=0).fit(conditioner, shapes())

    scaled = tiny_pixel_ddpm(optimizer={"base_lr": 1e-4, "scale_lr": True})
    with pytest.raises(RuntimeError, match=r"scale_lr=true.*connect\(model, datamodule\)"):
        quiet_trainer(max_steps=1, limit_val_batches=0).fit(scaled, shapes())


def test_a_copy_of_a_connected_model_shares_its_data() -> None:
    """Weight averaging deep-copies the module; the datamodule must not be copied with it."""
    model = tiny_pixel_ddpm()
    data = shapes()
    connect(model, data)
    twin = copy.deepcopy(model)
    assert twin._data is data
    assert torch.equal(next(twin.parameters()), next(model.parameters()))


def test_a_dataset_that_cannot_list_its_captions_is_named() -> None:
    class PlainData(ShapesDataModule):
        def build_split(self, split, augment=None):
            return torch.utils.data.TensorDataset(torch.zeros(2, 3, 16, 16))

    with pytest.raises(TypeError, match=r"returned a TensorDataset.*subclass .*CaptionedDataset"):
        PlainData(image_size=16).captions("train")


def test_an_encoder_handed_over_after_the_cached_splits_are_built_is_refused(
    tmp_path: Path,
) -> None:
    data = shapes(cache_latents=True, cache_dir=str(tmp_path / "cache"))
    data.setup()  # no trainer: the plain images
    with pytest.raises(RuntimeError, match=r"splits are built already.*connect\(model"):
        connect(tiny_pixel_ddpm(), data)
