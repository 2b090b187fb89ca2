"""DiagonalGaussian: KL against torch.distributions, sampling statistics, clamping."""

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ldm_lightning.nn.distributions import DiagonalGaussian


def test_kl_matches_torch_distributions():
    moments = torch.randn(3, 8, 2, 5)
    q = DiagonalGaussian(moments)
    mean, logvar = moments[:, :4], moments[:, 4:]
    expected = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0))
    torch.testing.assert_close(q.kl(), expected.sum(dim=(1, 2, 3)))
    torch.testing.assert_close(q.var, q.std.square())
    torch.testing.assert_close(q.mode(), mean)


def test_kl_of_standard_normal_is_zero():
    q = DiagonalGaussian(torch.zeros(2, 6, 3, 3))
    torch.testing.assert_close(q.kl(), torch.zeros(2))


def test_samples_have_the_posterior_moments():
    mean = torch.tensor([-1.0, 2.0]).view(1, 2, 1, 1).expand(1, 2, 200, 200)
    logvar = torch.log(torch.tensor([0.25, 4.0])).view(1, 2, 1, 1).expand(1, 2, 200, 200)
    q = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    z = q.sample(torch.Generator().manual_seed(0))
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.tensor([-1.0, 2.0]), atol=0.03, rtol=0)
    torch.testing.assert_close(z.std(dim=(0, 2, 3)), torch.tensor([0.5, 2.0]), atol=0.03, rtol=0)


def test_generator_makes_samples_reproducible():
    q = DiagonalGaussian(torch.randn(2, 4, 3, 3))
    a = q.sample(torch.Generator().manual_seed(7))
    b = q.sample(torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, q.sample(torch.Generator().manual_seed(8)))


def test_logvar_is_clamped():
    moments = torch.cat(
        [torch.zeros(1, 2, 1, 1), torch.tensor([-100.0, 100.0]).view(1, 2, 1, 1)], 1
    )
    q = DiagonalGaussian(moments)
    assert q.logvar.flatten().tolist() == [-30.0, 20.0]
    assert torch.isfinite(q.kl()).all()


def test_bad_moments_raise():
    with pytest.raises(ValueError, match="double_z"):
        DiagonalGaussian(torch.randn(1, 3, 2, 2))


def test_sample_is_reparameterised():
    moments = torch.randn(1, 4, 2, 2, requires_grad=True)
    q = DiagonalGaussian(moments)
    z = q.sample(torch.Generator().manual_seed(0))
    z.sum().backward()
    eps = (z - q.mean) / q.std
    torch.testing.assert_close(moments.grad[:, :2], torch.ones(1, 2, 2, 2))
    torch.testing.assert_close(moments.grad[:, 2:], (0.5 * q.std * eps).detach())
