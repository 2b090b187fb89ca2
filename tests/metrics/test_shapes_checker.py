"""The shapes checker reads real renders back: shape, colour, background, and a clean fit."""

from __future__ import annotations

import pytest
import torch

from ldm_lightning.data.shapes import COLOUR_NAMES, ShapesDataset, ShapeSpec, label_of, render
from ldm_lightning.metrics.shapes_checker import read_image, score_labels


@pytest.mark.parametrize(("shape", "colour", "background"), [
    ("circle", "red", "white"), ("square", "cyan", "black"), ("triangle", "yellow", "gray"),
])
def test_a_rendered_shape_reads_back_right(shape: str, colour: str, background: str) -> None:
    image = render(ShapeSpec(shape, colour, background, 0.45, 0.55, 0.3), 32)
    read = read_image(image)
    assert (read["shape"], read["colour"], read["background"]) == (shape, colour, background)
    assert read["iou"] > 0.9


def test_scores_of_real_renders_and_of_wrong_labels() -> None:
    dataset = ShapesDataset(36, 32, split="test")
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    labels = [dataset.spec(i).label for i in range(len(dataset))]
    scores = score_labels(images, labels)
    assert scores["accuracy"] == 1.0 and scores["clean"] == 1.0 and scores["shape_iou"] > 0.9
    wrong = [label_of("circle", "red") if label else label_of("square", "blue") for label in labels]
    assert score_labels(images, wrong)["accuracy"] < 0.2
    noise = torch.rand(4, 3, 32, 32) * 2 - 1
    assert score_labels(noise) == {"shape_iou": pytest.approx(0.0, abs=0.5), "clean": 0.0}
    with pytest.raises(ValueError, match="one label each"):
        score_labels(images, labels[:3])


def test_a_colour_the_dataset_never_draws_reads_back_when_named() -> None:
    image = render(ShapeSpec("circle", "orange", "blue", 0.5, 0.5, 0.3), 32)
    assert read_image(image)["colour"] in ("red", "yellow")  # the dataset's six only
    read = read_image(image, colours=[*COLOUR_NAMES, "orange"])
    assert (read["shape"], read["colour"]) == ("circle", "orange")
    with pytest.raises(ValueError, match="unknown shape colours \\['teal'\\].*NEW_COLOURS"):
        read_image(image, colours=["red", "teal"])
    with pytest.raises(ValueError, match="unknown shape colour 'teal'"):
        render(ShapeSpec("circle", "teal", "blue", 0.5, 0.5, 0.3), 32)
