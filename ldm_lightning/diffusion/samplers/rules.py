"""The step rules: DDPM ancestral, DDIM, DPM-Solver++(2M), Euler, Heun and Euler ancestral, each
written for any Gaussian process x = alpha x0 + sigma eps (package docstring)."""

from __future__ import annotations

import math

import numpy as np
from torch import Tensor

from ldm_lightning.diffusion.processes import NoiseLevel
from ldm_lightning.diffusion.samplers.base import Noise, Sampler, check_eta, check_variance


class DDPMSampler(Sampler):
    """Ancestral sampling (Ho et al. 2020, "Denoising diffusion probabilistic models",
    Algorithm 2) of the respaced chain with beta' = 1 - abar_t / abar_s (Nichol & Dhariwal 2021,
    improved DDPM sec. 4). ``variance``: "fixed_small" (beta_tilde, the posterior's) or
    "fixed_large" (beta')."""

    name = "ddpm"

    def __init__(self, variance: str = "fixed_small") -> None:
        check_variance(variance)
        self.variance = variance

    def step(
        self, x: Tensor, x0: Tensor, eps: Tensor, t: NoiseLevel, s: NoiseLevel, noise: Noise
    ) -> Tensor:
        """A draw from the posterior q(x_s | x_t, x0) (DDPM eqs. 6-7, for any alpha and sigma as
        in Kingma et al. 2021, "Variational diffusion models", eqs. 31-33):

            mean = (alpha_ts sigma_s^2 / sigma_t^2) x_t + (alpha_s sigma_ts^2 / sigma_t^2) x0,
            alpha_ts = alpha_t / alpha_s, sigma_ts^2 = sigma_t^2 - alpha_ts^2 sigma_s^2,

        variance sigma_ts^2 sigma_s^2 / sigma_t^2 ("fixed_small", beta_tilde) or sigma_ts^2
        ("fixed_large", beta' = 1 - abar_t / abar_s on the DDPM chain). No noise on the step to
        the clean level (z = 0 at the end of Algorithm 2)."""
        transition = _transition_variance(t, s)
        mean = (t.alpha / s.alpha * s.sigma**2 / t.sigma**2) * x + (
            s.alpha * transition / t.sigma**2
        ) * x0
        if s.clean:
            return mean
        var = transition * s.sigma**2 / t.sigma**2 if self.variance == "fixed_small" else transition
        return mean + var**0.5 * noise()


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021, "Denoising diffusion implicit models"): deterministic with
    ``eta`` = 0, DDPM's posterior variance with ``eta`` = 1."""

    name = "ddim"

    def __init__(self, eta: float = 0.0) -> None:
        check_eta(eta)
        self.eta = eta

    def step(
        self, x: Tensor, x0: Tensor, eps: Tensor, t: NoiseLevel, s: NoiseLevel, noise: Noise
    ) -> Tensor:
        """DDIM eq. 12: x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z, where c = eta times
        the posterior's std (DDIM eq. 16: eta sqrt((1 - abar_s)/(1 - abar_t)) sqrt(1 - abar_t /
        abar_s) on the DDPM chain; :class:`DDPMSampler` for any alpha, sigma)."""
        c = self.eta * (_transition_variance(t, s) * s.sigma**2 / t.sigma**2) ** 0.5
        x_s = s.alpha * x0 + max(s.sigma**2 - c**2, 0.0) ** 0.5 * eps
        return x_s + c * noise() if c > 0 else x_s


def _transition_variance(t: NoiseLevel, s: NoiseLevel) -> float:
    """sigma_ts^2 = sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2, the variance of q(x_t | x_s)
    (Kingma et al. 2021, eq. 3); 1 - abar_t / abar_s on the DDPM chain."""
    return max(t.sigma**2 - (t.alpha / s.alpha) ** 2 * s.sigma**2, 0.0)


class DPMSolverPP2MSampler(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): deterministic, second
    order with the previous step's x0 prediction, on the zero-endpoint grid (module docstring)."""

    name = "dpmpp_2m"
    zero_endpoint = True

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.x0_prev: Tensor | None = None
        self.h_prev: float | None = None

    def step(
        self, x: Tensor, x0: Tensor, eps: Tensor, t: NoiseLevel, s: NoiseLevel, noise: Noise
    ) -> Tensor:
        """Data prediction, midpoint form:

            x_s = (sigma_s / sigma_t) x - alpha_s (e^{-h} - 1) (D0 + D1 / 2),
            D0 = x0_t, D1 = (x0_t - x0_prev) / r, r = h_prev / h, h = lambda_s - lambda_t.

        First order (DDIM) without history, and after a step from alpha = 0 (h_prev = inf);
        the step to the clean level (sigma_s = 0, h = inf) returns x0_t, diffusers'
        ``lower_order_final`` with ``final_sigmas_type="zero"``.
        """
        if s.clean:
            return x0
        h = s.half_log_snr - t.half_log_snr
        sigma_ratio = s.sigma / t.sigma
        coef = -s.alpha * float(np.expm1(-h))
        first_order = self.x0_prev is None or math.isinf(self.h_prev)
        d = x0 if first_order else x0 + (0.5 * h / self.h_prev) * (x0 - self.x0_prev)
        self.x0_prev, self.h_prev = x0, h
        return sigma_ratio * x + coef * d


class EulerSampler(Sampler):
    """Euler's method for the probability-flow ODE dy/ds = (y - x0) / s in the solver's frame
    y = x / f, s = sigma / f (EDM, Karras et al. 2022, Algorithm 2 without churn; diffusers'
    ``EulerDiscreteScheduler``, ``FlowMatchEulerDiscreteScheduler``, ``EDMEulerScheduler``):

        d = (x_t - f_t x0) / sigma_t,    x_s = f_s x0 + sigma_s d.

    The same step as DDIM with eta = 0 in either frame (d = eps for f = alpha)."""

    name = "euler"

    def step(
        self, x: Tensor, x0: Tensor, eps: Tensor, t: NoiseLevel, s: NoiseLevel, noise: Noise
    ) -> Tensor:
        return s.frame * x0 + s.sigma * _derivative(x, x0, t)


def _derivative(x: Tensor, x0: Tensor, level: NoiseLevel) -> Tensor:
    """dy/ds = (y - x0) / s in the frame y = x / f, s = sigma / f: (x - f x0) / sigma."""
    return (x - level.frame * x0) / level.sigma


class HeunSampler(EulerSampler):
    """Heun's second-order method (EDM Algorithm 1; diffusers' ``HeunDiscreteScheduler``,
    ``FlowMatchHeunDiscreteScheduler``): an Euler step to x_s', the derivative there, and the
    step again with the mean of both derivatives,

        y_s = y_t + (s_s - s_t) (d_t + d_s') / 2,

    in the solver's frame (module docstring of :mod:`~ldm_lightning.diffusion.processes`). Two
    model evaluations per step except the last, to the clean level, which is Euler's (EDM
    Algorithm 1, line 8); from a level with f = 0 (alpha = 0 on the DDPM chain with zero
    terminal SNR, where y is infinite) the step stays Euler's too."""

    name = "heun"
    order = 2

    def correct(
        self,
        x: Tensor,
        x0: Tensor,
        eps: Tensor,
        x_s: Tensor,
        x0_s: Tensor,
        eps_s: Tensor,
        t: NoiseLevel,
        s: NoiseLevel,
    ) -> Tensor:
        if t.frame == 0.0:
            return x_s
        mean_derivative = 0.5 * (_derivative(x, x0, t) + _derivative(x_s, x0_s, s))
        return (s.frame / t.frame) * x + (s.sigma - s.frame * t.sigma / t.frame) * mean_derivative


class EulerAncestralSampler(Sampler):
    """Euler ancestral (k-diffusion's ``sample_euler_ancestral``; diffusers'
    ``EulerAncestralDiscreteScheduler``) in the variance-exploding frame y = x / alpha, noise
    levels s = sigma / alpha: a deterministic step down to s_down, then fresh noise up to s_s,

        s_up = min(s_s, eta s_s sqrt(1 - s_s^2 / s_t^2)),  s_down = sqrt(s_s^2 - s_up^2),
        x_s = alpha_s (x0 + s_down eps + s_up z).

    With eta = 1 the same distribution as DDPM's posterior (DDIM with eta = 1)."""

    name = "euler_ancestral"

    def __init__(self, eta: float = 1.0) -> None:
        check_eta(eta)
        self.eta = eta

    def step(
        self, x: Tensor, x0: Tensor, eps: Tensor, t: NoiseLevel, s: NoiseLevel, noise: Noise
    ) -> Tensor:
        if s.clean:
            return x0
        s_t, s_s = t.sigma_hat, s.sigma_hat
        up = min(s_s, self.eta * s_s * max(1.0 - (s_s / s_t) ** 2, 0.0) ** 0.5)
        down = (s_s**2 - up**2) ** 0.5
        return s.alpha * (x0 + down * eps + up * noise())
