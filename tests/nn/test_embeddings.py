"""Sinusoidal timestep embedding: closed form, diffusers reference, edge cases."""

import math

import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding

from ldm_lightning.nn.embeddings import timestep_embedding


def test_matches_closed_form_cos_then_sin() -> None:
    t = torch.tensor([0, 1, 7, 999])
    dim, half = 8, 4
    emb = timestep_embedding(t, dim)
    assert emb.shape == (4, dim) and emb.dtype == torch.float32
    for row, step in enumerate(t.tolist()):
        for i in range(half):
            freq = 10000.0 ** (-i / half)
            assert emb[row, i].item() == pytest.approx(math.cos(step * freq), abs=1e-4)
            assert emb[row, half + i].item() == pytest.approx(math.sin(step * freq), abs=1e-4)


def test_fractional_timesteps_and_max_period() -> None:
    emb = timestep_embedding(torch.tensor([0.5]), 4, max_period=100.0)
    freqs = [1.0, 100.0 ** (-1 / 2)]
    expected = [math.cos(0.5 * f) for f in freqs] + [math.sin(0.5 * f) for f in freqs]
    assert torch.allclose(emb[0], torch.tensor(expected), atol=1e-6)


def test_matches_diffusers_flip_sin_to_cos() -> None:
    t = torch.randint(0, 1000, (16,))
    ours = timestep_embedding(t, 64)
    ref = get_timestep_embedding(t, 64, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_odd_dim_pads_one_zero() -> None:
    emb = timestep_embedding(torch.tensor([0, 3]), 7)
    assert emb.shape == (2, 7)
    assert torch.equal(emb[:, -1], torch.zeros(2))
    assert torch.equal(emb[0, :6], torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]))


def test_bad_input_raises() -> None:
    with pytest.raises(ValueError, match="1-D"):
        timestep_embedding(torch.zeros(2, 1), 8)
    with pytest.raises(ValueError, match=">= 2"):
        timestep_embedding(torch.zeros(2), 1)
