"""Latent statistics and normalisation: the one estimate of the LDM scale factor."""

from __future__ import annotations

import pytest
import torch

from ldm_lightning.diffusion.latent_norm import LatentNormalizer, LatentStats


def latents() -> list[torch.Tensor]:
    """Three batches ``[B, 4, 5, 6]`` with a different mean and std per channel."""
    generator = torch.Generator().manual_seed(0)
    mean = torch.tensor([0.5, -1.0, 2.0, 0.0]).view(1, 4, 1, 1)
    std = torch.tensor([1.0, 0.2, 3.0, 0.7]).view(1, 4, 1, 1)
    return [torch.randn(b, 4, 5, 6, generator=generator) * std + mean for b in (2, 3, 5)]


def test_stats_are_the_per_channel_and_overall_moments() -> None:
    batches = latents()
    z = torch.cat(batches).double()
    stats = LatentStats.of(batches)
    assert stats.count == 10 * 5 * 6
    torch.testing.assert_close(stats.mean(), z.mean(dim=(0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        stats.std(), z.std(dim=(0, 2, 3), correction=0), rtol=1e-12, atol=1e-12
    )
    expected = 1.0 / z.std(correction=0).item()
    assert stats.inverse_std() == pytest.approx(expected, rel=1e-12)
    back = LatentStats.from_moments(stats.mean(), stats.std(), stats.count)
    assert back.inverse_std() == pytest.approx(expected, rel=1e-12)


def test_no_batches_and_constant_latents() -> None:
    with pytest.raises(ValueError, match="no batches"):
        LatentStats.of([])
    assert LatentStats.of([torch.ones(2, 3, 4, 4)]).inverse_std() == pytest.approx(1e6)


def test_normalizer_scales_by_one_over_std_and_round_trips_its_state() -> None:
    batches = latents()
    normalizer = LatentNormalizer().fit(LatentStats.of(batches))
    z = torch.cat(batches)
    assert normalizer.normalize(z).double().std(correction=0).item() == pytest.approx(1.0)
    torch.testing.assert_close(normalizer.denormalize(normalizer.normalize(z)), z)
    checkpoint = {"epoch": 3, **normalizer.state()}
    assert checkpoint["scale_factor"] == normalizer.scale
    restored = LatentNormalizer()
    restored.load_state(checkpoint)
    assert restored.scale == normalizer.scale
    restored.load_state({"scale_factor": None})  # a checkpoint without one keeps the scale
    assert restored.scale == normalizer.scale


def test_an_unfitted_normalizer_says_what_to_do() -> None:
    normalizer = LatentNormalizer()
    assert not normalizer.fitted and normalizer.state() == {"scale_factor": None}
    with pytest.raises(RuntimeError, match="scale factor is unknown"):
        normalizer.denormalize(torch.zeros(1, 3, 2, 2))
    assert LatentNormalizer(0.5).fitted
