"""Noise schedules against diffusers' DDPMScheduler and the Gaussian algebra of DDPM eqs. 4-7."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale

from ldm_lightning.diffusion import NoiseSchedule, extract

CASES = [
    ("linear", "linear", 1e-4, 0.02),
    ("scaled_linear", "scaled_linear", 0.00085, 0.012),
    ("cosine", "squaredcos_cap_v2", 1e-4, 0.02),
    ("squaredcos_cap_v2", "squaredcos_cap_v2", 1e-4, 0.02),
]


@pytest.mark.parametrize(("kind", "diffusers_kind", "beta_start", "beta_end"), CASES)
def test_matches_diffusers(kind: str, diffusers_kind: str, beta_start: float, beta_end: float):
    ours = NoiseSchedule.make(kind, timesteps=1000, beta_start=beta_start, beta_end=beta_end)
    ref = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule=diffusers_kind,
        beta_start=beta_start,
        beta_end=beta_end,
    )
    assert ours.timesteps == 1000 and ours.betas.shape == (1000,)
    assert ours.betas.dtype == torch.float32
    torch.testing.assert_close(ours.betas, ref.betas, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.alphas, ref.alphas, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, atol=1e-6, rtol=0)

    x0 = torch.randn(6, 3, 4, 4)
    noise = torch.randn(6, 3, 4, 4)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    torch.testing.assert_close(
        ours.q_sample(x0, t, noise), ref.add_noise(x0, noise, t), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize(("kind", "diffusers_kind", "beta_start", "beta_end"), CASES[:3])
def test_zero_terminal_snr(kind: str, diffusers_kind: str, beta_start: float, beta_end: float):
    """Lin et al. 2024, Algorithm 1: abar_T = 0 exactly, abar_1 kept, sqrt(abar) an affine map of
    the original's; the same betas as diffusers' rescale_zero_terminal_snr."""
    kwargs = {"kind": kind, "timesteps": 1000, "beta_start": beta_start, "beta_end": beta_end}
    base = NoiseSchedule.make(**kwargs)
    zts = NoiseSchedule.make(**kwargs, zero_terminal_snr=True)
    assert zts.alpha_bar(999) == 0.0 and zts._betas64[-1] == 1.0
    assert zts.alpha_bar(0) == pytest.approx(base.alpha_bar(0), rel=1e-15)
    betas = zts._betas64
    assert bool((betas[:-1] > 0).all()) and bool((betas[:-1] < 1).all())
    assert zts.snr[-1] == 0.0 and bool(zts.posterior_log_variance_clipped.isfinite().all())

    old, new = base._alphas_cumprod64.sqrt().numpy(), zts._alphas_cumprod64.sqrt().numpy()
    slope, intercept = np.polyfit(old, new, 1)
    np.testing.assert_allclose(slope * old + intercept, new, rtol=0, atol=1e-12)

    torch.testing.assert_close(betas, diffusers_rescale(base._betas64), rtol=0, atol=1e-12)
    ref = DDIMScheduler(
        beta_schedule=diffusers_kind,
        beta_start=beta_start,
        beta_end=beta_end,
        rescale_betas_zero_snr=True,
    )
    # diffusers rescales in float32
    torch.testing.assert_close(zts.alphas_cumprod, ref.alphas_cumprod, rtol=0, atol=2e-6)


def test_hand_values_linear():
    s = NoiseSchedule.make("linear", timesteps=3, beta_start=0.1, beta_end=0.3)
    betas = [0.1, 0.2, 0.3]
    abar = [0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.7]
    torch.testing.assert_close(s.betas, torch.tensor(betas))
    torch.testing.assert_close(s.alphas_cumprod, torch.tensor(abar))
    torch.testing.assert_close(s.alphas_cumprod_prev, torch.tensor([1.0, abar[0], abar[1]]))
    torch.testing.assert_close(s.snr, torch.tensor([a / (1 - a) for a in abar]))
    torch.testing.assert_close(s.sqrt_alphas_cumprod, torch.tensor(abar).sqrt())
    torch.testing.assert_close(s.sqrt_one_minus_alphas_cumprod, (1 - torch.tensor(abar)).sqrt())
    assert s.alpha_bar(-1) == 1.0
    assert s.alpha_bar(2) == pytest.approx(0.504, abs=1e-15)


def test_scaled_linear_and_cosine_closed_forms():
    s = NoiseSchedule.make("scaled_linear", timesteps=3, beta_start=0.01, beta_end=0.09)
    torch.testing.assert_close(s.betas, torch.tensor([0.01, 0.04, 0.09]))

    c = NoiseSchedule.make("cosine", timesteps=1000)
    f = [math.cos((i / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(1001)]
    abar = torch.tensor([f[i + 1] / f[0] for i in range(1000)], dtype=torch.float64)
    # abar_t = f(t)/f(0) until the 0.999 clip bites at the very end of the schedule
    torch.testing.assert_close(c.alphas_cumprod[:990].double(), abar[:990], atol=1e-6, rtol=0)
    assert c.betas.max().item() == pytest.approx(0.999)


def test_q_posterior_is_gaussian_conditioning():
    """q(x_{t-1} | x_t, x0) from conditioning the joint Gaussian of (x_{t-1}, x_t) given x0."""
    s = NoiseSchedule.make("linear", timesteps=1000)
    t = torch.tensor([1, 10, 500, 999])
    x0 = torch.randn(4, 2, 3, 3)
    x_t = torch.randn(4, 2, 3, 3)
    mean, var, log_var = s.q_posterior(x0, x_t, t)

    # independent float64 recomputation: float32 abar loses the digits 1 - abar needs at t = 1
    abar64 = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    abar = abar64[t].view(-1, 1, 1, 1)
    abar_prev = abar64[t - 1].view(-1, 1, 1, 1)
    alpha = abar / abar_prev
    # x_{t-1} = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) e1
    # x_t = sqrt(alpha) x_{t-1} + sqrt(1 - alpha) e2
    cov = alpha.sqrt() * (1 - abar_prev)
    expected_mean = abar_prev.sqrt() * x0.double() + cov / (1 - abar) * (
        x_t.double() - abar.sqrt() * x0.double()
    )
    expected_var = (1 - abar_prev) - cov**2 / (1 - abar)
    torch.testing.assert_close(mean.double(), expected_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(var.double(), expected_var, atol=1e-8, rtol=1e-4)
    torch.testing.assert_close(log_var.double(), expected_var.log(), atol=1e-4, rtol=0)
    assert var.shape == (4, 1, 1, 1)

    # at t = 0 the posterior is a point mass at x0; the log-variance is clipped to t = 1's
    mean0, var0, log_var0 = s.q_posterior(x0, x_t, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(mean0, x0, atol=1e-6, rtol=0)
    assert var0.abs().max().item() == 0.0
    torch.testing.assert_close(log_var0, s.posterior_variance[1].log().expand(4, 1, 1, 1))


def test_extract_shapes_and_to():
    s = NoiseSchedule.make("linear", timesteps=10)
    t = torch.tensor([0, 9])
    out = extract(s.betas, t, 4)
    assert out.shape == (2, 1, 1, 1)
    torch.testing.assert_close(out.flatten(), s.betas[[0, 9]])
    moved = s.to("cpu")
    assert moved is not s and moved.device == torch.device("cpu")
    torch.testing.assert_close(moved.alphas_cumprod, s.alphas_cumprod)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "quadratic"}, "linear, scaled_linear, cosine"),
        ({"kind": "linear", "timesteps": 0}, "timesteps must be a positive int"),
        ({"kind": "linear", "beta_start": 0.02, "beta_end": 1e-4}, "0 < beta_start < beta_end < 1"),
        ({"kind": "scaled_linear", "beta_start": 0.0}, "0 < beta_start < beta_end < 1"),
        ({"kind": "linear", "beta_end": 1.5}, "0 < beta_start < beta_end < 1"),
    ],
)
def test_invalid_schedules(kwargs: dict, message: str):
    with pytest.raises(ValueError, match=message):
        NoiseSchedule.make(**kwargs)


def test_invalid_custom_betas():
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        NoiseSchedule(torch.tensor([1.0, 0.5]))  # only the last beta may be 1
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        NoiseSchedule(torch.tensor([0.1, 0.0]))
    with pytest.raises(ValueError, match=r"the last may be 1"):
        NoiseSchedule(torch.tensor([0.1, 1.5]))
    with pytest.raises(ValueError, match="1-D"):
        NoiseSchedule(torch.ones(2, 2) * 0.1)
    with pytest.raises(ValueError, match="outside"):
        NoiseSchedule.make("linear", timesteps=10).alpha_bar(10)
