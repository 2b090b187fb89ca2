"""Noise processes: how training noises the data, what the network learns, and what its output
means to a sampler.

Every process here is Gaussian, ``x = alpha(t) x0 + sigma(t) eps`` with ``eps ~ N(0, I)``, and
differs in the path (alpha, sigma), in how training draws t, in the network's input, target and
loss weight, and in the grid of noise levels a sampler walks:

- :class:`DDPMProcess`: the discrete variance-preserving chain of DDPM (Ho et al. 2020),
  alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t), t ~ U{0..T-1}, the network predicts eps, v
  or x0 (:mod:`~ldm_lightning.diffusion.parameterization`).
- :class:`FlowProcess`: rectified flow / flow matching (Liu et al. 2022, Lipman et al. 2023),
  x_t = (1 - t) x0 + t eps, the network predicts the velocity eps - x0.
- :class:`EDMProcess`: Karras et al. 2022 ("Elucidating the design space", EDM), x = x0 +
  sigma eps with preconditioning (Table 1).

One process is chosen per model (``model/process=ddpm|flow|edm``); the samplers of
:mod:`~ldm_lightning.diffusion.samplers` walk any process's :class:`NoiseLevel` grid.

**The sampler's frame.** A sampler sees levels (alpha, sigma) and the denoised estimate x0 (and
eps = (x - alpha x0) / sigma). Second-order ODE solvers also need the variables in which they
integrate: ``y = x / f`` and ``s = sigma / f``, in which the probability-flow ODE is
``dy/ds = (y - x0) / s`` (EDM eq. 4 with s(t) = 1 after rescaling). Two frames are used:
``f = alpha`` (EDM's, for variance-preserving and variance-exploding processes; diffusers'
``EulerDiscreteScheduler`` and ``HeunDiscreteScheduler`` integrate in it) and ``f = 1`` for flow,
where ``s = t`` and the ODE is dx/dt = eps - x0 (diffusers' ``FlowMatchHeunDiscreteScheduler``).
Both integrate the same ODE; first-order steps are identical in either, second-order ones not.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ldm_lightning.diffusion.parameterization import (
    check_prediction,
    eps_from,
    target_from,
    x0_from,
)
from ldm_lightning.diffusion.schedules import NoiseSchedule, extract
from ldm_lightning.diffusion.weighting import WEIGHTINGS, loss_weight
from ldm_lightning.utils.targets import resolve_class

log = logging.getLogger(__name__)

KARRAS_RHO = 7.0
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


@dataclass(frozen=True)
class NoiseLevel:
    """One noise level of a process's sampling grid: ``x = alpha x0 + sigma eps``.

    ``t`` is the level in the process's own units (DDPM timestep, possibly fractional; flow time
    in [0, 1]; EDM sigma); ``frame`` is the scale f of the solver's frame (module docstring).
    The clean end of every grid is ``alpha = 1, sigma = 0``.
    """

    t: float
    alpha: float
    sigma: float
    frame: float

    @property
    def clean(self) -> bool:
        return self.sigma == 0.0

    @property
    def sigma_hat(self) -> float:
        """The noise-to-signal ratio sigma / alpha (EDM's sigma of the equivalent variance-
        exploding process; inf where alpha = 0)."""
        return math.inf if self.alpha == 0.0 else self.sigma / self.alpha

    @property
    def half_log_snr(self) -> float:
        """lambda = log(alpha / sigma) (DPM-Solver, Lu et al. 2022, sec. 3.1)."""
        if self.sigma == 0.0:
            return math.inf
        return -math.inf if self.alpha == 0.0 else math.log(self.alpha) - math.log(self.sigma)


CLEAN = NoiseLevel(t=0.0, alpha=1.0, sigma=0.0, frame=1.0)


def karras_sigmas(
    sigma_min: float, sigma_max: float, steps: int, rho: float = KARRAS_RHO
) -> list[float]:
    """EDM eq. 5, sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) -
    sigma_max^(1/rho)))^rho for i = 0..N-1: from sigma_max down to sigma_min (N = 1: sigma_max)."""
    if not 0 < sigma_min < sigma_max < math.inf:
        raise ValueError(
            f"Karras spacing needs 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}"
        )
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ramp = np.linspace(0, 1, steps) if steps > 1 else np.zeros(1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [float(s) for s in (hi + ramp * (lo - hi)) ** rho]


# name -> class, filled by the NoiseProcess subclasses that set a name.
PROCESSES: dict[str, type[NoiseProcess]] = {}


def _broadcast(values: Tensor, like: Tensor) -> Tensor:
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


class NoiseProcess(ABC):
    """A Gaussian noise process ``x = alpha(t) x0 + sigma(t) eps``; see the module docstring.

    Training: :meth:`draw_t`, :meth:`q_sample`, :meth:`network_input`, :meth:`target`,
    :meth:`loss_weight`. Sampling: :meth:`sampling_levels` and :meth:`denoise` (the network
    output at a level as estimates of x0 and eps). Setting the class attribute ``name``
    registers a subclass in :data:`PROCESSES`.
    """

    name: ClassVar[str]
    spacings: ClassVar[tuple[str, ...]]
    # The spacing of sampling_levels when none is given.
    default_spacing: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            PROCESSES[cls.name] = cls

    def to(self, device: torch.device | str) -> NoiseProcess:  # noqa: ARG002 - no tensors here
        """The process with its tensors on ``device``."""
        return self

    # ------------------------------------------------------------------ the path
    @abstractmethod
    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha [B], sigma [B]) float32 of levels ``t`` [B] on ``t``'s device."""

    def frame(self, alpha: float, sigma: float) -> float:
        """The scale f of the solver's frame at (alpha, sigma): alpha (module docstring)."""
        return alpha

    def level(self, t: float) -> NoiseLevel:
        """The :class:`NoiseLevel` at ``t`` (float64 coefficients)."""
        alpha, sigma = (float(c) for c in self.coefficients(torch.tensor([t], dtype=torch.float64)))
        return NoiseLevel(t=float(t), alpha=alpha, sigma=sigma, frame=self.frame(alpha, sigma))

    # ------------------------------------------------------------------ training
    @abstractmethod
    def draw_t(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> Tensor:
        """``n`` training levels, drawn on ``generator``'s device and moved to ``device``."""

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """A draw of q(x_t | x0): ``alpha(t) x0 + sigma(t) noise``."""
        alpha, sigma = self.coefficients(t)
        return _broadcast(alpha, x0) * x0 + _broadcast(sigma, x0) * noise

    def network_input(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """What the backbone is called with at levels ``t`` [B]: ``(input, time [B])``."""
        return x, t

    @abstractmethod
    def sigma_hat_of_time(self, time: Tensor) -> Tensor:
        """sigma / alpha at the levels whose :meth:`network_input` time is ``time`` [B]: how a
        wrapper of the network (the guidance interval) knows the noise level it is called at."""

    @abstractmethod
    def target(self, x0: Tensor, noise: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The regression target of the network's output for ``x_t = q_sample(x0, t, noise)``."""

    @abstractmethod
    def loss_weight(self, t: Tensor) -> Tensor:
        """Per-sample weight [B] float32 of the squared error ``||output - target||^2``."""

    # ------------------------------------------------------------------ sampling
    @abstractmethod
    def sampling_times(self, steps: int, spacing: str, zero_endpoint: bool) -> list[float]:
        """The decreasing levels ``t`` (in the process's units) a sampler evaluates the model at;
        ``zero_endpoint`` asks for a grid whose next point after the last is the clean end
        (:func:`~ldm_lightning.diffusion.samplers.inference_timesteps`)."""

    def sampling_levels(
        self, steps: int, spacing: str | None = None, zero_endpoint: bool = False
    ) -> list[NoiseLevel]:
        """The levels of :meth:`sampling_times` followed by the clean end :data:`CLEAN`."""
        spacing = self.default_spacing if spacing is None else spacing
        if spacing not in self.spacings:
            raise ValueError(
                f"timestep_spacing {spacing!r} does not apply to the {self.name} process; "
                f"choose one of: {', '.join(self.spacings)}"
            )
        return [self.level(t) for t in self.sampling_times(steps, spacing, zero_endpoint)] + [
            CLEAN
        ]

    def initial_scale(self, level: NoiseLevel) -> float:
        """The std of x at ``level`` for unit-variance data, sqrt(alpha^2 + sigma^2): the scale of
        the starting noise."""
        return math.hypot(level.alpha, level.sigma)

    @abstractmethod
    def denoise(self, output: Tensor, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The network ``output`` at ``x``, levels ``t`` [B], as estimates ``(x0, eps)``."""


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
        return target_from(x0, noise, _broadcast(alpha, x0), _broadcast(sigma, x0), self.prediction)

    def loss_weight(self, t: Tensor) -> Tensor:
        return loss_weight(
            t, self.schedule, self.prediction, self.loss_weighting, self.min_snr_gamma
        )

    def sampling_times(self, steps: int, spacing: str, zero_endpoint: bool) -> list[float]:
        from ldm_lightning.diffusion.samplers import inference_timesteps

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
        alpha, sigma = _broadcast(alpha, x), _broadcast(sigma, x)
        return (
            x0_from(output, x, alpha, sigma, self.prediction),
            eps_from(output, x, alpha, sigma, self.prediction),
        )


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
        t = _broadcast(t, x)
        return x - t * output, x + (1 - t) * output


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
        return _broadcast(c_in, x) * x, self.time_scale * c_noise

    def sigma_hat_of_time(self, time: Tensor) -> Tensor:
        return torch.exp(4 * time / self.time_scale)  # c_noise = ln(sigma) / 4

    def target(self, x0: Tensor, noise: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        c_skip, c_out, _, _ = self.preconditioning(t)
        return (x0 - _broadcast(c_skip, x0) * x_t) / _broadcast(c_out, x0)

    def loss_weight(self, t: Tensor) -> Tensor:
        """lambda(sigma) c_out(sigma)^2, which is 1 (EDM sec. 5, "loss weighting")."""
        _, c_out, _, _ = self.preconditioning(t)
        lam = (t**2 + self.sigma_data**2) / (t * self.sigma_data) ** 2
        return (lam * c_out**2).float()

    def sampling_times(self, steps: int, spacing: str, zero_endpoint: bool) -> list[float]:
        return karras_sigmas(self.sigma_min, self.sigma_max, steps, self.rho)

    def denoise(self, output: Tensor, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        c_skip, c_out, _, _ = self.preconditioning(t)
        x0 = _broadcast(c_skip, x) * x + _broadcast(c_out, x) * output
        return x0, (x - x0) / _broadcast(t, x)


DDPM = "ldm_lightning.diffusion.processes.DDPMProcess"
PROCESS_HINT = f"set model.process._target_ to a NoiseProcess subclass ({DDPM}, ...)"


def make_process(
    spec: Mapping[str, Any] | None,
    schedule: Mapping[str, Any] | None = None,
    prediction: str = "eps",
    loss_weighting: str = "uniform",
    min_snr_gamma: float = 5.0,
) -> NoiseProcess:
    """The process of a model config: ``spec`` is ``{_target_: <NoiseProcess class>, **options}``
    (``conf/model/process/``; None: DDPM). The DDPM process also takes the model's ``schedule``
    (``NoiseSchedule.make`` arguments), ``prediction``, ``loss_weighting`` and
    ``min_snr_gamma``; the other processes do not use them, and a setting of them other than
    the default is logged as ignored."""
    options = dict(spec or {})
    cls = resolve_class(options.pop("_target_", DDPM), NoiseProcess, "noise process", PROCESS_HINT)
    if issubclass(cls, DDPMProcess):
        made = NoiseSchedule.make(**{"kind": "linear", **(schedule or {})})
        return cls(made, prediction, loss_weighting, min_snr_gamma, **options)
    ignored = {
        key: value
        for key, value, default in (
            ("prediction", prediction, "eps"),
            ("loss_weighting", loss_weighting, "uniform"),
        )
        if value != default
    }
    if ignored:
        log.warning(
            "model.%s apply to the ddpm process only; the %s process ignores them",
            " and model.".join(f"{k}={v}" for k, v in ignored.items()),
            cls.name,
        )
    return cls(**options)
