"""FID/KID/IS against closed forms and a scipy reference; the real-feature cache."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ldm_lightning.data.shapes import ShapesDataModule
from ldm_lightning.metrics.fid import (
    INCEPTION_WEIGHTS_FILE,
    GenerativeMetrics,
    InceptionFeatures,
    build_feature_extractor,
    extract,
    extractor_identity,
    frechet_distance,
    gaussian_statistics,
    real_features,
    sample_size_warning,
)


class CountingFeatures(nn.Module):
    """8-D features: a fixed random 4x4 patch embedding, tanh, mean-pooled; counts calls."""

    num_features = 8

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, 4)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator))
            self.conv.bias.zero_()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.tanh(self.conv(x * 2 - 1)).mean((2, 3))


def images(n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 16, 16, generator=generator) * 2 - 1) * scale


def test_fid_of_a_set_against_itself_is_zero() -> None:
    extractor = CountingFeatures()
    real = images(64, 0)
    metrics = GenerativeMetrics(extractor, extract(extractor, real)[0])
    metrics.update(real[:40])
    metrics.update(real[40:])
    result = metrics.compute()
    assert result["fid"] == pytest.approx(0.0, abs=1e-6)
    assert result["num_generated"] == 64 and result["num_real"] == 64


def test_fid_equals_the_scipy_frechet_distance_of_the_same_features() -> None:
    extractor = CountingFeatures()
    real, fake = images(96, 0), images(80, 1, scale=0.6)
    real_feats, fake_feats = extract(extractor, real)[0], extract(extractor, fake)[0]
    metrics = GenerativeMetrics(extractor, real_feats)
    for chunk in fake.split(32):
        metrics.update(chunk)
    ours = metrics.compute()["fid"]
    reference = frechet_distance(
        *gaussian_statistics(real_feats.numpy()), *gaussian_statistics(fake_feats.numpy())
    )
    assert reference > 0.01  # the sets differ, so the comparison is not 0 == 0
    assert ours == pytest.approx(reference, rel=1e-3)


def test_frechet_distance_closed_form_for_isotropic_gaussians() -> None:
    # N(m1, a I) vs N(m2, b I) in d dims: |m1-m2|^2 + d (sqrt(a) - sqrt(b))^2.
    d, a, b = 5, 4.0, 1.0
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    value = frechet_distance(mu1, a * np.eye(d), mu2, b * np.eye(d))
    assert value == pytest.approx(d * 0.25 + d * (2.0 - 1.0) ** 2)


class OneHotLogits(nn.Module):
    """Image i of a batch gets confident logits for class ``round(mean pixel * 100) % K``."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.classes = classes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels = (x.mean((1, 2, 3)) * 100).round().long() % self.classes
        logits = torch.nn.functional.one_hot(labels, self.classes).float() * 50
        return x.mean((2, 3)), logits


def test_inception_score_is_the_number_of_equally_used_confident_classes() -> None:
    # p(y|x) one-hot and p(y) uniform over K classes: IS = exp(KL) = exp(log K) = K.
    classes = 4
    extractor = OneHotLogits(classes)
    levels = torch.tensor([k / 100 for k in range(classes)] * 8)  # class k for level k/100
    batch = (levels * 2 - 1).view(-1, 1, 1, 1).expand(-1, 3, 4, 4).contiguous()
    metrics = GenerativeMetrics(extractor, torch.randn(8, 3), inception_score=True, is_splits=1)
    metrics.update(batch)
    assert metrics.compute()["is_mean"] == pytest.approx(classes, rel=1e-4)


def test_kid_equals_the_unbiased_polynomial_mmd_when_subsets_are_the_whole_sets() -> None:
    # KID = MMD_u^2 with k(x, y) = (x.y / d + 1)^3 (Binkowski et al. 2018, eq. 3 and sec. 3).
    extractor = CountingFeatures()
    x = extract(extractor, images(40, 0))[0].double()
    y = extract(extractor, images(40, 3, scale=0.5))[0].double()
    d = x.shape[1]

    def kernel(a, b):
        return (a @ b.T / d + 1) ** 3

    def off_diagonal_mean(k):
        n = k.shape[0]
        return (k.sum() - k.diagonal().sum()) / (n * (n - 1))

    expected = off_diagonal_mean(kernel(x, x)) + off_diagonal_mean(kernel(y, y))
    expected -= 2 * kernel(x, y).mean()
    metrics = GenerativeMetrics(extractor, x.float(), kid=True, kid_subset_size=1000)
    metrics.update(images(40, 3, scale=0.5))
    result = metrics.compute()
    assert float(expected) > 0
    assert result["kid_mean"] == pytest.approx(float(expected), rel=1e-3)


def datamodule(**overrides) -> ShapesDataModule:
    settings = {"image_size": 16, "num_train": 24, "num_val": 8, "num_test": 8, **overrides}
    return ShapesDataModule(**settings)


def test_real_features_are_cached_and_reused(tmp_path: Path) -> None:
    extractor = CountingFeatures()
    first = real_features(datamodule(), "train", extractor, tmp_path, batch_size=8)
    calls = extractor.calls
    assert calls == 3 and first.shape == (24, 8)
    again = real_features(datamodule(batch_size=4), "train", extractor, tmp_path, batch_size=8)
    assert extractor.calls == calls  # batch size does not change pixels: same cache file
    torch.testing.assert_close(again, first)
    assert len(list(tmp_path.glob("shapes-train-16px-*.pt"))) == 1
    assert not list(tmp_path.glob("*.tmp-*"))


@pytest.mark.parametrize(
    ("change", "split"),
    [({"num_train": 16}, "train"), ({"image_size": 32}, "train"), ({"seed": 1}, "train"),
     ({}, "val")],
)
def test_cache_is_invalidated_by_dataset_resolution_and_split(tmp_path, change, split) -> None:
    extractor = CountingFeatures()
    base = real_features(datamodule(), "train", extractor, tmp_path, batch_size=8)
    calls = extractor.calls
    other = real_features(datamodule(**change), split, extractor, tmp_path, batch_size=8)
    assert extractor.calls > calls
    assert other.shape != base.shape or not torch.allclose(other, base)
    assert len(list(tmp_path.glob("*.pt"))) == 2


def test_cache_is_invalidated_by_other_extractor_weights(tmp_path: Path) -> None:
    real_features(datamodule(), "train", CountingFeatures(seed=0), tmp_path)
    other = CountingFeatures(seed=1)
    real_features(datamodule(), "train", other, tmp_path)
    assert other.calls == 1
    assert extractor_identity(other) != extractor_identity(CountingFeatures(seed=0))


def test_a_corrupt_cache_file_is_rebuilt(tmp_path: Path) -> None:
    extractor = CountingFeatures()
    first = real_features(datamodule(), "train", extractor, tmp_path)
    (path,) = tmp_path.glob("*.pt")
    path.write_bytes(b"truncated")
    again = real_features(datamodule(), "train", extractor, tmp_path)
    assert extractor.calls == 2
    torch.testing.assert_close(again, first)


def test_num_real_takes_the_first_images_and_must_fit_the_split(tmp_path: Path) -> None:
    extractor = CountingFeatures()
    all_features = real_features(datamodule(), "train", extractor, tmp_path)
    first = real_features(datamodule(), "train", extractor, tmp_path, num_images=10)
    torch.testing.assert_close(first, all_features[:10])
    with pytest.raises(ValueError, match="num_real=99"):
        real_features(datamodule(), "train", extractor, tmp_path, num_images=99)


def test_feature_extractor_specs() -> None:
    built = build_feature_extractor("torch.nn.Flatten")
    assert isinstance(built, nn.Flatten) and not built.training
    built = build_feature_extractor({"_target_": "torch.nn.Linear", "in_features": 2,
                                     "out_features": 3})
    assert isinstance(built, nn.Linear) and not built.weight.requires_grad
    with pytest.raises(ValueError, match="'inception', 'dinov2' or the _target_"):
        build_feature_extractor("resnet")
    with pytest.raises(ValueError, match="it must return"):
        extract(nn.Identity(), images(2, 0))


def test_missing_inception_weights_name_the_file_and_folder(monkeypatch, tmp_path) -> None:
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(RuntimeError) as excinfo:
        InceptionFeatures()
    message = str(excinfo.value)
    assert INCEPTION_WEIGHTS_FILE in message
    assert str(tmp_path / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE) in message


def test_sample_size_warning_cites_the_bias_below_10k() -> None:
    assert "linear in 1/N" in sample_size_warning(5000)
    assert sample_size_warning(10_000) is None
