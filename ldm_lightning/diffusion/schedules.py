"""Noise schedules of the forward process q(x_t | x_0) (DDPM, Ho et al. 2020, sec. 2).

All quantities are computed once in float64 on the CPU (cumulative products over 1000 steps lose
digits in float32) and exposed as float32 tensors on the schedule's device. Schedules follow the
conventions of diffusers' schedulers, so ``linear``, ``scaled_linear`` and ``cosine`` give the
same ``betas`` as ``beta_schedule="linear" | "scaled_linear" | "squaredcos_cap_v2"`` there.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SCHEDULES = ("linear", "scaled_linear", "cosine")
_ALIASES = {"squaredcos_cap_v2": "cosine"}
_COSINE_MAX_BETA = 0.999


def extract(arr: Tensor, t: Tensor, ndim: int) -> Tensor:
    """Gather per-sample coefficients ``arr[t]`` shaped to broadcast over a batch.

    Args:
        arr: [T] coefficients indexed by timestep.
        t: [B] integer timesteps.
        ndim: number of dimensions of the tensor the result multiplies (4 for [B, C, H, W]).

    Returns:
        [B, 1, ..., 1] with ``ndim`` dimensions, on ``t``'s device.
    """
    # index_select, not arr[t]: advanced indexing is ~100x slower on a busy multi-threaded CPU
    return arr.to(t.device).index_select(0, t).reshape(-1, *([1] * (ndim - 1)))


def _cosine_betas(timesteps: int, s: float) -> Tensor:
    """Improved DDPM (Nichol & Dhariwal 2021) eq. 17: abar(t) = cos^2((t/T + s)/(1 + s) pi/2),
    beta_t = min(1 - abar(t+1)/abar(t), 0.999) (the clip of their sec. 3.2)."""

    def alpha_bar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / timesteps) / alpha_bar(i / timesteps), _COSINE_MAX_BETA)
        for i in range(timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2024 ("Common diffusion noise schedules and sample steps are flawed"),
    Algorithm 1: shift sqrt(abar_t) so that its last value is 0 and scale it so that its first is
    unchanged, then recover the betas: abar_T = 0 exactly (the last beta is 1), abar_1 kept.
    Such a schedule needs v (or x0) prediction: at abar_T = 0, eps says nothing about x0."""
    root = torch.cumprod(1.0 - betas.double(), dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    abar = root.square()
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


class NoiseSchedule:
    """A discrete variance schedule beta_1..beta_T and everything derived from it.

    Index ``t`` runs over 0..T-1 (DDPM's t = 1..T shifted by one, as in diffusers). Attributes
    (float32, [T], on ``device``):

    - ``betas``, ``alphas`` = 1 - betas, ``alphas_cumprod`` = abar_t = prod_{s<=t} alpha_s,
      ``alphas_cumprod_prev`` = abar_{t-1} (abar_{-1} = 1),
      ``sqrt_alphas_cumprod``, ``sqrt_one_minus_alphas_cumprod``;
    - ``posterior_variance`` = beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t (DDPM eq. 7),
      ``posterior_log_variance_clipped`` (log beta_tilde with the t=0 entry, which is 0, replaced
      by t=1's, as in the DDPM code), ``posterior_mean_coef1`` = sqrt(abar_{t-1}) beta_t /
      (1 - abar_t) and ``posterior_mean_coef2`` = sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t)
      (DDPM eq. 7);
    - ``snr`` = abar_t / (1 - abar_t) (Kingma et al. 2021, "Variational diffusion models", eq. 1).

    Build one with :meth:`make`, or pass any betas in (0, 1).
    """

    def __init__(
        self, betas: Tensor, kind: str = "custom", device: torch.device | str | None = None
    ) -> None:
        betas64 = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if betas64.ndim != 1 or betas64.numel() == 0:
            raise ValueError(
                f"betas must be a non-empty 1-D tensor, got shape {tuple(betas64.shape)}"
            )
        inside = (betas64 > 0) & (betas64 < 1)
        if not bool(inside.all()) and not (bool(inside[:-1].all()) and betas64[-1] == 1):
            raise ValueError(
                f"every beta must lie in (0, 1) (the last may be 1: zero terminal SNR); got "
                f"min {betas64.min().item():.3g}, max {betas64.max().item():.3g}"
            )
        self.kind = kind
        self.timesteps = int(betas64.numel())
        self.device = torch.device(device if device is not None else "cpu")
        self._betas64 = betas64
        self._alphas_cumprod64 = torch.cumprod(1.0 - betas64, dim=0)

        abar = self._alphas_cumprod64
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        posterior_variance = betas64 * (1.0 - abar_prev) / (1.0 - abar)
        # beta_tilde_0 = 0, so its log is clipped to the next value (DDPM code, improved DDPM).
        log_var_source = (
            torch.cat([posterior_variance[1:2], posterior_variance[1:]])
            if self.timesteps > 1
            else posterior_variance.clamp_min(1e-20)
        )
        values = {
            "betas": betas64,
            "alphas": 1.0 - betas64,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": abar.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - abar).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": log_var_source.log(),
            "posterior_mean_coef1": betas64 * abar_prev.sqrt() / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * (1.0 - betas64).sqrt() / (1.0 - abar),
            "snr": abar / (1.0 - abar),
        }
        for name, value in values.items():
            setattr(self, name, value.to(device=self.device, dtype=torch.float32))

    @classmethod
    def make(
        cls,
        kind: str,
        timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        cosine_s: float = 0.008,
        zero_terminal_snr: bool = False,
    ) -> NoiseSchedule:
        """Build a named schedule.

        - ``linear``: beta_t = linspace(beta_start, beta_end) (DDPM sec. 4).
        - ``scaled_linear``: beta_t = linspace(sqrt(beta_start), sqrt(beta_end))^2, the schedule
          CompVis LDM and Stable Diffusion call "linear" (use beta_start=0.00085, beta_end=0.012).
        - ``cosine`` (alias ``squaredcos_cap_v2``): improved DDPM eq. 17 with offset ``cosine_s``,
          betas clipped at 0.999; ``beta_start``/``beta_end`` are unused.

        ``zero_terminal_snr`` rescales any of them to abar_T = 0
        (:func:`rescale_zero_terminal_snr`).
        """
        name = _ALIASES.get(kind, kind)
        if name not in SCHEDULES:
            valid = ", ".join(SCHEDULES + tuple(_ALIASES))
            raise ValueError(f"unknown noise schedule {kind!r}; choose one of: {valid}")
        if not isinstance(timesteps, int) or timesteps <= 0:
            raise ValueError(f"timesteps must be a positive int, got {timesteps!r}")
        if name == "cosine":
            if cosine_s <= 0:
                raise ValueError(f"cosine_s must be > 0, got {cosine_s}")
            betas = _cosine_betas(timesteps, cosine_s)
            return cls(rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas, kind=name)
        if not 0 < beta_start < beta_end < 1:
            raise ValueError(
                f"{name} schedule needs 0 < beta_start < beta_end < 1, "
                f"got beta_start={beta_start}, beta_end={beta_end}"
            )
        if name == "linear":
            betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
        else:
            betas = (
                torch.linspace(
                    math.sqrt(beta_start), math.sqrt(beta_end), timesteps, dtype=torch.float64
                )
                ** 2
            )
        return cls(rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas, kind=name)

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """A copy whose float32 tensors live on ``device``."""
        return NoiseSchedule(self._betas64, kind=self.kind, device=device)

    def alpha_bar(self, t: int) -> float:
        """abar_t in float64 as a Python float; ``t = -1`` gives abar_{-1} = 1 (clean data)."""
        if not -1 <= t < self.timesteps:
            raise ValueError(f"timestep {t} outside [-1, {self.timesteps - 1}]")
        return 1.0 if t < 0 else float(self._alphas_cumprod64[t])

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Sample q(x_t | x_0) (DDPM eq. 4): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.

        Args:
            x0: [B, ...] clean data. t: [B] integer timesteps. noise: like ``x0``, N(0, I).
        """
        a = extract(self.sqrt_alphas_cumprod, t, x0.ndim).to(x0.dtype)
        s = extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim).to(x0.dtype)
        return a * x0 + s * noise

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Posterior q(x_{t-1} | x_t, x_0) = N(mu_tilde, beta_tilde I) (DDPM eqs. 6-7).

        Args:
            x0: [B, ...] clean (or predicted clean) data. x_t: like ``x0``. t: [B] timesteps.

        Returns:
            (mean [B, ...], variance [B, 1, ..., 1], clipped log variance [B, 1, ..., 1]).
        """
        c1 = extract(self.posterior_mean_coef1, t, x_t.ndim).to(x_t.dtype)
        c2 = extract(self.posterior_mean_coef2, t, x_t.ndim).to(x_t.dtype)
        variance = extract(self.posterior_variance, t, x_t.ndim)
        log_variance = extract(self.posterior_log_variance_clipped, t, x_t.ndim)
        return c1 * x0 + c2 * x_t, variance, log_variance

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(kind={self.kind!r}, timesteps={self.timesteps}, device={self.device})"
        )
