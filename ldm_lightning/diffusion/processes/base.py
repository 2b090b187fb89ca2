"""What every noise process is: :class:`NoiseProcess`, the :class:`NoiseLevel`s a sampler walks,
and the Karras grid (see the package docstring of :mod:`ldm_lightning.diffusion.processes`)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

KARRAS_RHO = 7.0


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


def broadcast(values: Tensor, like: Tensor) -> Tensor:
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
        return broadcast(alpha, x0) * x0 + broadcast(sigma, x0) * noise

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
