"""Rectified flow / flow matching as a noise process."""

from __future__ import annotations

import torch
from torch import Tensor

from ldm_lightning.diffusion.processes.base import NoiseProcess, broadcast

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


class FlowProcess(NoiseProcess):
    """Rectified flow / flow matching: x_t = (1 - t) x0 + t eps, t in [0, 1] (Liu et al. 2022,
    "Flow straight and fast", eq. 1; Lipman et al. 2023, "Flow matching", sec. 4.1 with
    sigma_min = 0). The network predicts the velocity v = eps - x0 (target of the conditional
    flow matching loss, weight 1); x0 = x_t - t v, eps = x_t + (1 - t) v.

    Training t (Esser et al. 2024, "Scaling rectified flow transformers", SD3): ``uniform`` or
    ``logit_normal`` (t = sigmoid(u), u ~ N(logit_mean, logit_std^2), sec. 3.1), then the
    resolution ``shift`` alpha (sec. 5.3.2): t' = alpha t / (1 + (alpha - 1) t), which moves
    levels towards noise for larger images (their eq. 23). Sampling walks diffusers'
    ``FlowMatchEulerDiscreteScheduler`` grid, "linspace": t = linspace(1, t_min, steps) shifted,
    then 0, where t_min = shift(1/T) is the smallest training level already shifted once (so its
    end is shifted twice, as there and in SD3's reference sampler). The backbone is told
    ``time_scale * t`` (1000: the range of DDPM timesteps its embedding is made for).
    """

    name = "flow"
    spacings = ("linspace",)
    default_spacing = "linspace"

    def __init__(
        self,
        timestep_sampling: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        shift: float = 1.0,
        time_scale: float = 1000.0,
        num_train_timesteps: int = 1000,
    ) -> None:
        if timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(
                f"unknown timestep_sampling {timestep_sampling!r}; choose one of: "
                f"{', '.join(TIMESTEP_SAMPLINGS)}"
            )
        if shift <= 0 or logit_std <= 0 or time_scale <= 0 or num_train_timesteps < 1:
            raise ValueError(
                "shift, logit_std, time_scale and num_train_timesteps must be > 0, got "
                f"{shift}, {logit_std}, {time_scale}, {num_train_timesteps}"
            )
        self.timestep_sampling = timestep_sampling
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.shift = shift
        self.time_scale = time_scale
        self.num_train_timesteps = num_train_timesteps

    def shifted(self, t: Tensor) -> Tensor:
        """SD3 eq. 23: t' = shift t / (1 + (shift - 1) t)."""
        return self.shift * t / (1 + (self.shift - 1) * t)

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = t if t.is_floating_point() else t.float()
        return 1.0 - t, t

    def frame(self, alpha: float, sigma: float) -> float:
        """f = 1: the solver integrates dx/dt = eps - x0 in x and t (module docstring)."""
        return 1.0

    def draw_t(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> Tensor:
        draw_on = generator.device if generator is not None else device
        if self.timestep_sampling == "uniform":
            t = torch.rand(n, generator=generator, device=draw_on)
        else:
            u = torch.randn(n, generator=generator, device=draw_on)
            t = torch.sigmoid(self.logit_mean + self.logit_std * u)
        return self.shifted(t).to(device)

    def network_input(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return x, self.time_scale * t

    def sigma_hat_of_time(self, time: Tensor) -> Tensor:
        t = time / self.time_scale
        return t / (1 - t)

    def target(self, x0: Tensor, noise: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return noise - x0

    def loss_weight(self, t: Tensor) -> Tensor:
        return torch.ones(t.shape, device=t.device)

    def sampling_times(self, steps: int, spacing: str, zero_endpoint: bool) -> list[float]:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        t_min = self.shifted(torch.tensor(1.0 / self.num_train_timesteps, dtype=torch.float64))
        t = torch.linspace(1.0, float(t_min), steps, dtype=torch.float64)
        return [float(v) for v in self.shifted(t)]

    def denoise(self, output: Tensor, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        t = broadcast(t, x)
        return x - t * output, x + (1 - t) * output
