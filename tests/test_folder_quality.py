"""The offline folder-sample scorer: digit renderer, classifier accuracy, Fréchet, HF energy.

"Samples" that are real digit images the classifier never saw must score like the held-out
real images; uniform noise must score chance accuracy, a large distance and a high HF ratio.
16 px and 40 images per class keep one classifier to a few seconds on one thread.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

EXPERIMENTS = Path(__file__).parents[1] / "experiments"
SIZE, PER_CLASS, EPOCHS = 16, 40, 60


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def digits():
    return _load("make_digit_folder", EXPERIMENTS / "make_digit_folder.py")


@pytest.fixture(scope="module")
def quality():
    return _load("folder_quality", EXPERIMENTS / "bench" / "folder_quality.py")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, digits):
    """A real folder (seed 0), unseen real "samples" (seed 1) and noise "samples"."""
    root = tmp_path_factory.mktemp("folders")
    digits.make_digit_folder(root / "real", PER_CLASS, SIZE, seed=0)
    digits.make_digit_folder(root / "unseen", 10, SIZE, seed=1)
    rng = np.random.default_rng(0)
    for name in digits.CLASS_NAMES:
        (root / "noise" / name).mkdir(parents=True)
        for index in range(10):
            pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "noise" / name / f"{index:05d}.png")
    return root


@pytest.fixture(scope="module")
def trained(folders, quality):
    """The classifier trained once on the real folder, and the real splits."""
    class_names, (train_x, train_y), held_out = quality.load_real(folders / "real", SIZE)
    model = quality.train_classifier(train_x, train_y, len(class_names), epochs=EPOCHS)
    return class_names, model, held_out


def test_digit_folder_has_the_classes_and_counts_and_is_deterministic(tmp_path, digits) -> None:
    first = digits.make_digit_folder(tmp_path / "a", per_class=3, size=20, seed=5)
    second = digits.make_digit_folder(tmp_path / "b", per_class=3, size=20, seed=5)
    other = digits.make_digit_folder(tmp_path / "c", per_class=3, size=20, seed=6)
    assert sorted(p.name for p in first.iterdir()) == sorted(digits.CLASS_NAMES)
    for name in digits.CLASS_NAMES:
        files = sorted((first / name).glob("*.png"))
        assert [p.name for p in files] == ["00000.png", "00001.png", "00002.png"]
        for path in files:
            with Image.open(path) as image:
                assert image.size == (20, 20) and image.mode == "RGB"
            assert path.read_bytes() == (second / name / path.name).read_bytes()
    five = "five/00000.png"
    assert (first / five).read_bytes() != (other / five).read_bytes()
    # Images of one class differ from each other (not one template).
    images = [np.asarray(Image.open(p)) for p in sorted((first / "seven").glob("*.png"))]
    assert not np.array_equal(images[0], images[1])


def test_unseen_real_images_score_like_real_ones(folders, quality, trained) -> None:
    class_names, model, (held_x, held_y) = trained
    _, held_predictions = quality.predict(model, held_x)
    assert quality.accuracy(held_predictions, held_y, class_names)["accuracy"] > 0.75
    images, labels = quality.load_samples(folders / "unseen", class_names, SIZE)
    assert images.shape == (100, 3, SIZE, SIZE)
    _, predictions = quality.predict(model, images)
    scores = quality.accuracy(predictions, labels, class_names)
    assert scores["accuracy"] > 0.8 and scores["count"] == 100
    assert set(scores["per_class"]) == set(class_names)
    ratio = quality.high_frequency_fraction(images).mean() / quality.high_frequency_fraction(
        held_x).mean()
    assert 0.8 < ratio < 1.25


def test_noise_scores_chance_a_large_distance_and_high_frequencies(
    folders, quality, trained
) -> None:
    class_names, model, (held_x, _) = trained
    unseen, _ = quality.load_samples(folders / "unseen", class_names, SIZE)
    noise, labels = quality.load_samples(folders / "noise", class_names, SIZE)
    _, predictions = quality.predict(model, noise)
    assert quality.accuracy(predictions, labels, class_names)["accuracy"] < 0.3
    held_features, _ = quality.predict(model, held_x)
    unseen_features, _ = quality.predict(model, unseen)
    noise_features, _ = quality.predict(model, noise)
    real_distance = quality.frechet(held_features, unseen_features)
    assert quality.frechet(noise_features, held_features) > 10 * real_distance
    hf_real = quality.high_frequency_fraction(held_x).mean()
    hf_noise = quality.high_frequency_fraction(noise).mean()
    assert hf_noise > 0.75 and hf_noise / hf_real > 3


def test_frechet_distance_of_identical_sets_is_zero(quality) -> None:
    features = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    assert quality.frechet(features, features) == pytest.approx(0.0, abs=1e-6)
    assert quality.frechet(features, features + 1) == pytest.approx(8.0, rel=1e-6)


def test_high_frequency_fraction_of_flat_smooth_and_checkerboard_images(quality) -> None:
    flat = torch.full((1, 3, 16, 16), 0.3)
    coords = torch.arange(16.0)
    smooth = torch.cos(2 * torch.pi * coords / 16).expand(1, 3, 16, 16)  # 1/16 cycles/px
    checker = ((coords[:, None] + coords[None, :]) % 2 * 2 - 1).expand(1, 3, 16, 16)
    values = quality.high_frequency_fraction(torch.cat([flat, smooth, checker]))
    assert values.tolist() == pytest.approx([0.0, 0.0, 1.0], abs=1e-9)


def test_cli_writes_a_report(folders, quality, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "report.json"
    argv = ["folder_quality.py", "--real", str(folders / "real"), "--samples",
            str(folders / "unseen"), "--image-size", str(SIZE), "--epochs", "2", "--out",
            str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    quality.main()
    report = json.loads(out.read_text())
    assert report["num_classes"] == 10 and report["num_samples"] == 100
    assert report["num_train"] + report["num_real_held_out"] == 10 * PER_CLASS
    for key in ("frechet", "frechet_real_floor", "hf_ratio"):
        assert report[key] >= 0
    assert "hf energy" in capsys.readouterr().out


def test_samples_need_the_real_class_names(folders, quality, tmp_path) -> None:
    (tmp_path / "dog").mkdir()
    Image.new("RGB", (SIZE, SIZE)).save(tmp_path / "dog" / "0.png")
    with pytest.raises(ValueError, match="unknown: dog"):
        quality.load_samples(tmp_path, ["zero", "one"], SIZE)
