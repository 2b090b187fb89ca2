"""Latent statistics and normalisation: the LDM scale factor, or a mean and std per channel."""

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
    assert not normalizer.fitted and normalizer.state() == {
        "latent_norm": "scalar", "scale_factor": None, "latent_mean": None, "latent_std": None
    }
    with pytest.raises(RuntimeError, match="scale factor is unknown"):
        normalizer.denormalize(torch.zeros(1, 3, 2, 2))
    assert LatentNormalizer(0.5).fitted
    with pytest.raises(RuntimeError, match="per-channel mean and std is unknown"):
        LatentNormalizer(mode="channel").normalize(torch.zeros(1, 3, 2, 2))


def test_scalar_mode_is_a_multiplication_by_the_scale() -> None:
    z = torch.cat(latents())
    normalizer = LatentNormalizer(0.37)
    assert torch.equal(normalizer.normalize(z), z * 0.37)
    assert torch.equal(normalizer.denormalize(z), z / 0.37)
    assert normalizer.summary() == {"scale_factor": 0.37}


def test_channel_mode_centres_and_scales_each_channel() -> None:
    """``z0_c = (z_c - mean_c) / std_c``: per channel mean 0 and population std 1."""
    batches = latents()
    stats = LatentStats.of(batches)
    normalizer = LatentNormalizer(mode="channel").fit(stats)
    assert normalizer.fitted and normalizer.scale is None
    assert normalizer.mean == stats.mean().tolist() and normalizer.std == stats.std().tolist()
    assert all(type(v) is float for v in normalizer.mean + normalizer.std)
    z = torch.cat(batches).double()
    z0 = normalizer.normalize(z)
    assert z0.dtype == torch.float64
    torch.testing.assert_close(z0.mean(dim=(0, 2, 3)), torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(
        z0.std(dim=(0, 2, 3), correction=0), torch.ones(4, dtype=torch.float64)
    )
    expected = (z - stats.mean().view(1, 4, 1, 1)) / stats.std().view(1, 4, 1, 1)
    torch.testing.assert_close(z0, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(normalizer.denormalize(z0), z, rtol=1e-12, atol=1e-12)
    z32 = z.float()  # the model's dtype: shift and scale follow the latents'
    assert normalizer.normalize(z32).dtype == torch.float32
    torch.testing.assert_close(normalizer.denormalize(normalizer.normalize(z32)), z32)
    # Any trailing dimensions: a sequence of latents [B, C, L].
    torch.testing.assert_close(normalizer.normalize(z.flatten(2)), expected.flatten(2))
    assert list(normalizer.summary()) == [
        *(f"latent_mean/{c}" for c in range(4)), *(f"latent_std/{c}" for c in range(4))
    ]
    with pytest.raises(ValueError, match=r"has 4 channels, but the latents \(2, 3, 5, 6\)"):
        normalizer.normalize(torch.zeros(2, 3, 5, 6))


def test_a_constant_channel_is_not_a_division_by_zero() -> None:
    z = torch.randn(4, 2, 3, 3)
    z[:, 1] = 0.25
    normalizer = LatentNormalizer(mode="channel").fit(LatentStats.of([z]))
    assert normalizer.std[1] == pytest.approx(1e-6)
    z0 = normalizer.normalize(z)
    assert torch.isfinite(z0).all() and torch.equal(z0[:, 1], torch.zeros(4, 3, 3))
    torch.testing.assert_close(normalizer.denormalize(z0), z)


def test_channel_state_round_trips_and_the_checkpoints_mode_wins() -> None:
    normalizer = LatentNormalizer(mode="channel").fit(LatentStats.of(latents()))
    checkpoint = {"epoch": 3, **normalizer.state()}
    assert checkpoint["latent_norm"] == "channel" and checkpoint["scale_factor"] is None
    assert checkpoint["latent_mean"] == normalizer.mean
    assert checkpoint["latent_std"] == normalizer.std
    restored = LatentNormalizer(mode="channel")
    restored.load_state(checkpoint)
    assert restored.state() == normalizer.state()
    restored.load_state({"latent_norm": "channel", "latent_mean": None, "latent_std": None})
    assert restored.state() == normalizer.state()  # a checkpoint without one keeps it
    # What the weights were trained on wins over the mode the module was built with.
    scalar = LatentNormalizer(0.5)
    scalar.load_state(checkpoint)
    assert scalar.mode == "channel" and scalar.state() == normalizer.state()


def test_a_checkpoint_with_only_a_scale_factor_loads_as_scalar() -> None:
    """Checkpoints written before the channel mode hold ``scale_factor`` alone."""
    old = {"epoch": 3, "scale_factor": 0.25}
    for normalizer in (LatentNormalizer(), LatentNormalizer(mode="channel")):
        normalizer.load_state(old)
        assert normalizer.mode == "scalar" and normalizer.scale == 0.25
        assert normalizer.mean is None and normalizer.std is None
        z = torch.randn(2, 3, 4, 4)
        assert torch.equal(normalizer.normalize(z), z * 0.25)
    with pytest.raises(ValueError, match=r"latent_norm='pixel' is unknown; valid: \('scalar'"):
        LatentNormalizer().load_state({"latent_norm": "pixel", "scale_factor": 1.0})


def test_unknown_mode_and_a_fixed_scale_in_channel_mode_are_refused() -> None:
    with pytest.raises(ValueError, match=r"latent_norm='pixel' is unknown; valid: \('scalar'"):
        LatentNormalizer(mode="pixel")
    with pytest.raises(ValueError, match=r"scale_factor=0.5 .*model.scale_factor=null"):
        LatentNormalizer(0.5, mode="channel")
