"""The DDPM chain as a noise process."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ldm_lightning.diffusion.parameterization import (
    check_prediction,
    eps_from,
    target_from,
    x0_from,
)
from ldm_lightning.diffusion.processes.base import NoiseProcess, broadcast, karras_sigmas
from ldm_lightning.diffusion.schedules import NoiseSchedule, extract
from ldm_lightning.diffusion.timesteps import inference_timesteps
from ldm_lightning.diffusion.weighting import WEIGHTINGS, loss_weight


class DDPMProcess(NoiseProcess):
    """DDPM's discrete variance-preserving chain on a :class:`NoiseSchedule` (DDPM eq. 4).

    Training draws t ~ U{0..T-1} and regresses ``prediction`` ("eps", "v" or "x0"; DDPM eq. 14,
    Salimans & Ho 2022 sec. 4) with ``loss_weighting`` ("uniform" or "min_snr", Hang et al.
    2023). Sampling grids are the spacings of
    :func:`~ldm_lightning.diffusion.samplers.inference_timesteps` (Lin et al. 2024, table 2) and
    "karras": EDM eq. 5 on sigma_hat = sqrt((1 - abar) / abar) between the schedule's ends, at
    fractional timesteps found by interpolating log sigma_hat (as diffusers'
    ``use_karras_sigmas``).
    """

    name = "ddpm"
    spacings = ("leading", "trailing", "linspace", "karras")
    default_spacing = "trailing"

    def __init__(
        self,
        schedule: NoiseSchedule,
        prediction: str = "eps",
        loss_weighting: str = "uniform",
        min_snr_gamma: float = 5.0,
    ) -> None:
        check_prediction(prediction)
        if loss_weighting not in WEIGHTINGS:
            raise ValueError(
                f"unknown loss weighting {loss_weighting!r}; choose one of: {', '.join(WEIGHTINGS)}"
            )
        if loss_weighting == "min_snr" and min_snr_gamma <= 0:
            raise ValueError(f"min_snr needs min_snr_gamma > 0, got {min_snr_gamma}")
        if prediction == "eps" and schedule.alpha_bar(schedule.timesteps - 1) == 0.0:
            raise ValueError(
                "a zero-terminal-SNR schedule (abar_T = 0) cannot be learnt with "
                "prediction=eps: x0 = (x - sigma eps) / alpha is undefined at t = T-1. Use "
                "model.prediction=v (Lin et al. 2024, sec. 3.2)."
            )
        self.schedule = schedule
        self.prediction = prediction
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = min_snr_gamma
        abar = schedule._alphas_cumprod64
        self._log_sigma_hat = 0.5 * (torch.log1p(-abar) - torch.log(abar))  # float64 [T]

    def to(self, device: torch.device | str) -> DDPMProcess:
        """The schedule's float32 tensors on ``device`` (kept across calls)."""
        if self.schedule.device != torch.device(device):
            self.schedule = self.schedule.to(device)
        return self

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Integer ``t``: the schedule's sqrt(abar_t), sqrt(1 - abar_t). Fractional ``t``: from
        log sigma_hat interpolated linearly between the neighbouring timesteps."""
        if not t.is_floating_point() or bool((t == t.round()).all()):
            index = t.long().to(self.schedule.device)
            if t.dtype == torch.float64:
                abar = self.schedule._alphas_cumprod64.index_select(0, index.cpu())
                return abar.sqrt(), (1.0 - abar).sqrt()
            return (
                extract(self.schedule.sqrt_alphas_cumprod, index, 1).to(t.device),
                extract(self.schedule.sqrt_one_minus_alphas_cumprod, index, 1).to(t.device),
            )
        t64 = t.double().cpu()
        lo = t64.floor().long().clamp(0, self.schedule.timesteps - 1)
        hi = (lo + 1).clamp(max=self.schedule.timesteps - 1)
        w = t64 - lo
        log_s = (1 - w) * self._log_sigma_hat[lo] + w * self._log_sigma_hat[hi]
        alpha = torch.rsqrt(1 + torch.exp(2 * log_s))
        sigma = alpha * torch.exp(log_s)
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        return alpha.to(t.device, dtype), sigma.to(t.device, dtype)

    def draw_t(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> Tensor:
        draw_on = generator.device if generator is not None else device
        return torch.randint(
            0, self.schedule.timesteps, (n,), generator=generator, device=draw_on
        ).to(device)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return self.schedule.q_sample(x0, t, noise)

    def network_input(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, t)``, with whole timesteps as integers (the UNet's usual input)."""
        whole = t.is_floating_point() and bool((t == t.round()).all())
        return x, t.long() if whole else t

    def sigma_hat_of_time(self, time: Tensor) -> Tensor:
        alpha, sigma = self.coefficients(time)
        return sigma / alpha

    def target(self, x0: Tensor, noise: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        alpha, sigma = self.coefficients(t)
        return target_from(x0, noise, broadcast(alpha, x0), broadcast(sigma, x0), self.prediction)

    def loss_weight(self, t: Tensor) -> Tensor:
        return loss_weight(
            t, self.schedule, self.prediction, self.loss_weighting, self.min_snr_gamma
        )

    def sampling_times(self, steps: int, spacing: str, zero_endpoint: bool) -> list[float]:
        if spacing != "karras":
            return [float(t) for t in inference_timesteps(
                self.schedule.timesteps, steps, spacing, zero_endpoint=zero_endpoint
            )]
        log_s = self._log_sigma_hat
        if not bool(torch.isfinite(log_s).all()):
            raise ValueError(
                "timestep_spacing=karras needs a finite sigma_max: this schedule has abar_T = 0 "
                "(zero terminal SNR); use trailing spacing"
            )
        sigmas = karras_sigmas(math.exp(log_s[0]), math.exp(log_s[-1]), steps)
        # t with log sigma_hat(t) = log sigma, by linear interpolation between timesteps
        grid = log_s.numpy()
        return [float(np.interp(math.log(s), grid, np.arange(len(grid)))) for s in sigmas]

    def denoise(self, output: Tensor, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        alpha, sigma = self.coefficients(t)
        alpha, sigma = broadcast(alpha, x), broadcast(sigma, x)
        return (
            x0_from(output, x, alpha, sigma, self.prediction),
            eps_from(output, x, alpha, sigma, self.prediction),
        )
