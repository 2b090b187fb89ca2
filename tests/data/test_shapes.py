"""The synthetic shapes dataset: exact labels and captions, determinism, splits, pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm_lightning.data.shapes import (
    BACKGROUND_COLOURS,
    NUM_CLASSES,
    SHAPE_COLOURS,
    ShapesDataModule,
    ShapesDataset,
    ShapeSpec,
    describe_label,
    label_of,
    render,
    shape_mask,
)


def test_items_are_deterministic_by_seed_and_differ_across_seeds_and_splits() -> None:
    a, b = ShapesDataset(10, 16, "train", seed=3), ShapesDataset(10, 16, "train", seed=3)
    assert all(torch.equal(a[i]["image"], b[i]["image"]) for i in range(10))
    other_seed, other_split = (
        ShapesDataset(10, 16, "train", seed=4),
        ShapesDataset(10, 16, "val", seed=3),
    )
    assert [a.spec(i) for i in range(10)] != [other_seed.spec(i) for i in range(10)]
    assert [a.spec(i) for i in range(10)] != [other_split.spec(i) for i in range(10)]


def test_caption_and_label_describe_the_pixels() -> None:
    spec = ShapeSpec("circle", "red", "gray", 0.5, 0.5, 0.3)
    assert spec.caption == "a red circle on a gray background"
    assert describe_label(spec.label) == ("circle", "red") and spec.label == label_of(
        "circle", "red"
    )
    image = ((render(spec, 32) + 1) / 2 * 255).round()
    assert image[:, 16, 16].tolist() == list(SHAPE_COLOURS["red"])
    assert image[:, 0, 0].tolist() == list(BACKGROUND_COLOURS["gray"])


def test_the_segmentation_is_the_shape_where_it_covers_half_a_pixel() -> None:
    dataset = ShapesDataset(8, 32, "val")
    for index in range(8):
        item, spec = dataset[index], dataset.spec(index)
        assert item["segmentation"].dtype == torch.long
        assert torch.equal(item["segmentation"], torch.from_numpy(shape_mask(spec, 32) >= 0.5))
        pixels = ((item["image"] + 1) / 2 * 255).round()
        inside = item["segmentation"].bool() & torch.from_numpy(shape_mask(spec, 32) == 1)
        colour = torch.tensor(SHAPE_COLOURS[spec.colour], dtype=torch.float32)
        assert (colour == pixels[:, inside].T).all()
        assert torch.equal(item["image"], render(spec, 32))


@pytest.mark.parametrize(
    "shape,area",
    [("circle", np.pi * 0.3**2), ("square", 2 * 0.3**2), ("triangle", 3 * np.sqrt(3) / 4 * 0.3**2)],
)
def test_shape_areas_match_their_closed_forms(shape: str, area: float) -> None:
    mask = shape_mask(ShapeSpec(shape, "red", "gray", 0.5, 0.5, 0.3), 64, antialias=8)
    assert mask.mean() == pytest.approx(area, rel=0.02)


def test_every_label_occurs_and_background_never_equals_shape_colour() -> None:
    data = ShapesDataset(600, 8, "train")
    specs = [data.spec(i) for i in range(600)]
    assert {s.label for s in specs} == set(range(NUM_CLASSES))
    assert all(s.background != s.colour for s in specs)
    assert all(
        s.radius <= min(s.centre_x, s.centre_y, 1 - s.centre_x, 1 - s.centre_y) + 1e-9
        for s in specs
    )


@pytest.mark.parametrize("size", [8, 17, 64])
def test_any_resolution_in_range(size: int) -> None:
    item = ShapesDataset(2, size)[1]
    assert item["image"].shape == (3, size, size)
    assert item["image"].min() >= -1 and item["image"].max() <= 1


def test_datamodule_batches_and_errors() -> None:
    data = ShapesDataModule(image_size=16, batch_size=4, num_train=8, num_val=4, num_test=4)
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["label"].dtype == torch.long
    assert len(batch["caption"]) == 4 and data.num_classes == 18
    with pytest.raises(ValueError, match="out of range"):
        describe_label(18)
    with pytest.raises(ValueError, match="unknown split"):
        ShapesDataset(1, 8, "holdout")
    with pytest.raises(IndexError):
        ShapesDataset(1, 8)[1]


def test_latent_cache_settings_are_checked() -> None:
    import pytorch_lightning as pl

    from ldm_lightning.models import connect
    from tests.models.test_autoencoder_module import tiny

    with pytest.raises(ValueError, match=r"cache_latents=true needs data.cache_dir"):
        ShapesDataModule(image_size=16, cache_latents=True)
    data = ShapesDataModule(
        image_size=16,
        batch_size=4,
        num_train=8,
        num_val=4,
        num_test=4,
        cache_latents=True,
        cache_dir="unused",
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        max_steps=1,
    )
    model = tiny()
    connect(model, data)  # an autoencoder hands over no encoder
    with pytest.raises(ValueError, match=r"no model handed over a first stage.*cache_latents"):
        trainer.fit(model, datamodule=data)


def test_excluded_classes_are_never_drawn_and_labels_index_the_rest() -> None:
    cyan = ["cyan circle", "cyan square", "cyan triangle"]
    full, held_out = ShapesDataset(300, 8), ShapesDataset(300, 8, exclude=cyan)
    data = ShapesDataModule(image_size=8, exclude=cyan)
    names = data.class_names
    assert data.num_classes == len(names) == 15 and not set(cyan) & set(names)
    for index in range(300):
        spec, item = held_out.spec(index), held_out[index]
        assert spec.colour != "cyan"
        assert names[item["label"]] == f"{spec.colour} {spec.shape}"
        assert item["caption"] == spec.caption
        if full.spec(index).colour != "cyan":  # only the excluded draws change
            assert spec == full.spec(index)
    # The cache key (the pixels' settings) tells the two apart.
    assert data.transform_signature() != ShapesDataModule(image_size=8).transform_signature()


def test_exclude_names_are_checked_before_any_work() -> None:
    with pytest.raises(ValueError, match=r"unknown shapes classes \['orange circle'\].*valid"):
        ShapesDataModule(exclude=["orange circle"])
    everything = [f"{c} {s}" for c in SHAPE_COLOURS for s in ("circle", "square", "triangle")]
    with pytest.raises(ValueError, match="leave at least one"):
        ShapesDataModule(exclude=everything)
