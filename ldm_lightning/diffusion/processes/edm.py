"""EDM (Karras et al. 2022) as a noise process."""

from __future__ import annotations

import torch
from torch import Tensor

from ldm_lightning.diffusion.processes.base import (
    KARRAS_RHO,
    NoiseProcess,
    broadcast,
    karras_sigmas,
)


class EDMProcess(NoiseProcess):
    """EDM (Karras et al. 2022): x = x0 + sigma eps with the preconditioning of Table 1,

        D(x; sigma) = c_skip x + c_out F(c_in x; c_noise),
        c_skip = sigma_data^2 / (sigma^2 + sigma_data^2), c_out = sigma sigma_data /
        sqrt(sigma^2 + sigma_data^2), c_in = 1 / sqrt(sigma^2 + sigma_data^2),
        c_noise = ln(sigma) / 4,

    training with ln sigma ~ N(p_mean, p_std^2) and loss weight lambda(sigma) = (sigma^2 +
    sigma_data^2) / (sigma sigma_data)^2 on ||D - x0||^2, which is weight lambda c_out^2 = 1 on
    the F-space error to the effective target (x0 - c_skip x) / c_out (EDM eq. 8). Sampling
    walks the Karras grid (eq. 5, rho = 7) from sigma_max to sigma_min, then 0. ``sigma_data``
    is 1 by default: the LDM normalises latents to unit variance (EDM's 0.5 is for pixels in
    [-1, 1]). The backbone is told ``time_scale * c_noise``.
    """

    name = "edm"
    spacings = ("karras",)
    default_spacing = "karras"

    def __init__(
        self,
        sigma_data: float = 1.0,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = KARRAS_RHO,
        time_scale: float = 1000.0,
    ) -> None:
        if min(sigma_data, p_std, rho, time_scale) <= 0 or not 0 < sigma_min < sigma_max:
            raise ValueError(
                "EDM needs sigma_data, p_std, rho, time_scale > 0 and 0 < sigma_min < sigma_max, "
                f"got sigma_data={sigma_data}, p_std={p_std}, rho={rho}, time_scale={time_scale}, "
                f"sigma_min={sigma_min}, sigma_max={sigma_max}"
            )
        self.sigma_data = sigma_data
        self.p_mean = p_mean
        self.p_std = p_std
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.rho = rho
        self.time_scale = time_scale

    def preconditioning(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) of EDM Table 1 at ``sigma``."""
        sd2 = self.sigma_data**2
        total = sigma**2 + sd2
        return sd2 / total, sigma * self.sigma_data / total.sqrt(), total.rsqrt(), sigma.log() / 4

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.ones_like(t), t

    def draw_t(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> Tensor:
        draw_on = generator.device if generator is not None else device
        u = torch.randn(n, generator=generator, device=draw_on)
        return (self.p_mean + self.p_std * u).exp().to(device)

    def network_input(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        _, _, c_in, c_noise = self.preconditioning(t)
        return broadcast(c_in, x) * x, self.time_scale * c_noise

    def sigma_hat_of_time(self, time: Tensor) -> Tensor:
        return torch.exp(4 * time / self.time_scale)  # c_noise = ln(sigma) / 4

    def target(self, x0: Tensor, noise: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        c_skip, c_out, _, _ = self.preconditioning(t)
        return (x0 - broadcast(c_skip, x0) * x_t) / broadcast(c_out, x0)

    def loss_weight(self, t: Tensor) -> Tensor:
        """lambda(sigma) c_out(sigma)^2, which is 1 (EDM sec. 5, "loss weighting")."""
        _, c_out, _, _ = self.preconditioning(t)
        lam = (t**2 + self.sigma_data**2) / (t * self.sigma_data) ** 2
        return (lam * c_out**2).float()

    def sampling_times(self, steps: int, spacing: str, zero_endpoint: bool) -> list[float]:
        return karras_sigmas(self.sigma_min, self.sigma_max, steps, self.rho)

    def denoise(self, output: Tensor, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        c_skip, c_out, _, _ = self.preconditioning(t)
        x0 = broadcast(c_skip, x) * x + broadcast(c_out, x) * output
        return x0, (x - x0) / broadcast(t, x)
