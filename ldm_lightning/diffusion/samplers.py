"""Reverse-process samplers: DDPM ancestral, DDIM, DPM-Solver++(2M), Euler, Heun and Euler
ancestral, on any Gaussian noise process (:mod:`~ldm_lightning.diffusion.processes`).

Each algorithm is a :class:`Sampler`: its step rule, its options (constructor arguments) and
its ``name``, under which defining the class registers it in :data:`SAMPLERS`. A new sampler is
one such class, and one ``conf/model/sampler/<name>.yaml`` (its ``_target_`` and options) to
choose it from a config: ``model/sampler=<name>``.

A step sees the levels t > s it goes between, each ``x = alpha x0 + sigma eps`` (a
:class:`~ldm_lightning.diffusion.processes.NoiseLevel`), and the model's estimates of x0 and eps
at t; every rule is written for any (alpha, sigma), so the same sampler runs on the DDPM chain,
on flow matching and on EDM. Every sampler walks the process's decreasing grid (for DDPM a
subsequence tau_1 > ... > tau_S of training timesteps, see :func:`inference_timesteps`), one model
evaluation each (two for Heun), and ends with a step to the clean level (alpha = 1, sigma = 0),
i.e. the last step returns the model's prediction of x0. This is diffusers' convention for
``DDPMScheduler``, ``DDIMScheduler(set_alpha_to_one=True)``,
``DPMSolverMultistepScheduler(final_sigmas_type="zero")`` and the Euler/Heun schedulers.

Matching diffusers exactly (``steps_offset=0``, ``clip_sample=False``), for every
``timestep_spacing`` and number of steps:

- ``ddpm``: ``DDPMScheduler`` with the same ``timestep_spacing``. One deliberate difference: no
  noise is added on the step to abar = 1 (DDPM Algorithm 2, z = 0 at the end); diffusers adds
  sqrt(1 - abar_t) z there with ``variance_type="fixed_large"`` when the last timestep is not 0.
- ``ddim``: ``DDIMScheduler(set_alpha_to_one=True)`` with "leading", and with "trailing" when
  ``T % steps == 0``. diffusers' DDIM always steps back by ``T // steps`` rather than to the next
  timestep of its grid, so with "linspace" it differs from this (and from its own DDPMScheduler).
- ``dpmpp_2m``: ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
  lower_order_final=True, final_sigmas_type="zero")``, on that scheduler's own grid
  (``inference_timesteps(..., zero_endpoint=True)``): "leading" and "linspace" are built from
  steps + 1 points whose last, t = 0, is not evaluated but replaced by sigma = 0.

Why DPM-Solver does not evaluate t = 0 (DPM-Solver++, Lu et al. 2022, Algorithm 2): the
"leading" and "linspace" grids of DDPM/DDIM end at t = 0, and a multistep solver on them takes
its last second-order step from t ~ T / steps to t = 0. That interval spans a jump in half
log-SNR lambda = log(alpha / sigma) of h = 4.61 - 2.53 = 2.07 (50 steps, linear schedule), 3.5x
the previous one, and extrapolating x0 over it overshoots: on Gaussian data of std 0.4 this
sampler used to return std 0.431 where diffusers returns 0.400. On the reference's grid the last
model evaluation is at t ~ T / (steps + 1), and the step from there to sigma = 0 (h = inf,
r = h_prev / h = 0, where the second-order correction is undefined) is first order: it returns
the x0 prediction. Even with a perfect model few steps cost accuracy, DDIM being first order and
DPM-Solver++(2M) second order: see tests/diffusion/test_samplers_closed_form.py.

Which sampler for which process: all six run on all three processes. ``euler`` (EDM Alg. 2 without
churn) is DDIM with eta = 0 worked out in the solver's frame, and ``euler_ancestral`` (k-diffusion,
diffusers' ``EulerAncestralDiscreteScheduler``) is DDIM with eta = 1, so on the same grid each pair
draws the same samples; they differ from DDIM in their grids (Karras spacing, EDM's and flow's
grids) and, for Heun, in the second-order correction.

Random numbers are drawn with ``torch.randn(..., generator=generator)`` on the generator's device
(CPU when no generator is given) and then moved, so one seed gives the same images on any device:
first x_T, then one draw per stochastic step, in the order diffusers' schedulers draw them.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ldm_lightning.diffusion.parameterization import check_prediction
from ldm_lightning.diffusion.processes import DDPMProcess, NoiseLevel, NoiseProcess
from ldm_lightning.diffusion.schedules import NoiseSchedule
from ldm_lightning.utils.targets import resolve_class

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
VARIANCES = ("fixed_small", "fixed_large")

ModelFn = Callable[[Tensor, Tensor], Tensor]
Noise = Callable[[], Tensor]
# guide(x, level, x0, eps) -> (x0, eps): a change to the estimates, e.g. classifier guidance.
Guide = Callable[[Tensor, NoiseLevel, Tensor, Tensor], tuple[Tensor, Tensor]]


def inference_timesteps(
    num_train_timesteps: int, steps: int, spacing: str = "leading", zero_endpoint: bool = False
) -> list[int]:
    """Decreasing timesteps to evaluate the model at (Lin et al. 2024, "Common diffusion noise
    schedules and sample steps are flawed", table 2), as diffusers' ``set_timesteps`` computes them.

    With ``zero_endpoint=False`` (DDPM, DDIM: ``DDPMScheduler``, ``DDIMScheduler``), n = steps:

    - "leading": k * (T // n) for k = n-1..0; ends at 0, never reaches T-1.
    - "trailing": round(T - k T/steps) - 1 for k = 0..steps-1; starts at T-1.
    - "linspace": round(linspace(0, T-1, n)) reversed; both ends included.

    With ``zero_endpoint=True`` (DPM-Solver: ``DPMSolverMultistepScheduler``), t = 0 is the
    sigma = 0 end of the last step rather than a model evaluation: "leading" and "linspace" take
    n = steps + 1 points and drop their last, t = 0, so steps <= T - 1; "trailing" is unchanged
    (its next point, k = steps, would be t = -1, which is abar = 1 already).
    """
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(
            f"unknown timestep_spacing {spacing!r}; choose one of: {', '.join(TIMESTEP_SPACINGS)}"
        )
    drop_zero = zero_endpoint and spacing != "trailing"
    max_steps = num_train_timesteps - 1 if drop_zero else num_train_timesteps
    if not 1 <= steps <= max_steps:
        raise ValueError(
            f"steps must be in [1, {max_steps}] (the schedule's T"
            f"{' - 1: t = 0 is not evaluated' if drop_zero else ''}), got {steps}"
        )
    n = steps + 1 if drop_zero else steps
    if spacing == "leading":
        ts = (np.arange(0, n) * (num_train_timesteps // n))[::-1]
    elif spacing == "trailing":
        ts = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / steps)) - 1
    else:
        ts = np.linspace(0, num_train_timesteps - 1, n).round()[::-1]
    return [int(t) for t in ts[:steps]]


class Sampler(ABC):
    """The reverse step x_t -> x_s (s < t) of one sampling algorithm; :func:`sample` runs the loop.

    A subclass implements :meth:`step` and takes its options as constructor arguments. Setting
    the class attribute ``name`` registers it in :data:`SAMPLERS`, so that ``sample(...,
    sampler=name)`` and ``model.sampling.sampler: name`` choose it; a subclass that does not set
    it keeps its parent's name and is chosen by instance or ``_target_`` (:func:`make_sampler`).
    ``zero_endpoint`` picks the grid of :func:`inference_timesteps`; :meth:`reset` clears what
    a multistep method remembers, before each run. A second-order method sets ``order = 2`` and
    implements :meth:`correct`, which :func:`sample` calls with the model's estimates at the
    point :meth:`step` returned (except on the step to the clean level).
    """

    name: ClassVar[str]
    zero_endpoint: ClassVar[bool] = False
    order: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            SAMPLERS[cls.name] = cls

    def reset(self) -> None:  # noqa: B027 - a one-step method has nothing to forget
        """Forget the previous run (:func:`sample` calls it before the first step)."""

    @abstractmethod
    def step(
        self, x: Tensor, x0: Tensor, eps: Tensor, t: NoiseLevel, s: NoiseLevel, noise: Noise
    ) -> Tensor:
        """x_s from x_t = ``x`` and the model's estimates ``x0``, ``eps`` at level ``t``; ``s``
        is the next level (the clean one, alpha = 1 and sigma = 0, on the last step);
        ``noise()`` draws z ~ N(0, I) of x's shape (see the module docstring)."""

    def correct(  # noqa: B027 - only second-order methods have a correction
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
        """For ``order = 2``: x_s from the step's estimates at t and those (``x0_s``, ``eps_s``)
        at the point ``x_s`` :meth:`step` returned."""
        raise NotImplementedError


# name -> class, filled by the Sampler subclasses that set a name.
SAMPLERS: dict[str, type[Sampler]] = {}


def check_variance(variance: str) -> None:
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; choose one of: {', '.join(VARIANCES)}")


def check_eta(eta: float) -> None:
    if eta < 0:
        raise ValueError(f"eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like), got {eta}")


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


def sampler_class(spec: str | Mapping[str, Any]) -> type[Sampler]:
    """The class of a sampler config: a name of :data:`SAMPLERS`, or a dict whose ``_target_``
    names a :class:`Sampler` subclass of ``ldm_lightning`` or of a module already imported
    (:func:`~ldm_lightning.utils.targets.resolve_class`: nothing else is imported or called)."""
    choices = f"choose one of: {', '.join(SAMPLERS)}"
    if isinstance(spec, Mapping):
        return resolve_class(
            spec.get("_target_"), Sampler, "sampler class", f"{choices}, or a Sampler's _target_"
        )
    if spec not in SAMPLERS:
        raise ValueError(f"unknown sampler {spec!r}; {choices}")
    return SAMPLERS[spec]


def make_sampler(spec: str | Mapping[str, Any] | Sampler, **options: Any) -> Sampler:
    """The sampler ``spec`` describes: a :class:`Sampler` as it is, or its class
    (:func:`sampler_class`) built with a dict's options, and for the arguments the dict leaves
    out, those of ``options`` its constructor takes and that are not None (:func:`sample`'s ``eta``
    and ``variance``)."""
    if isinstance(spec, Sampler):
        return spec
    cls = sampler_class(spec)
    accepted = inspect.signature(cls).parameters
    own = {k: v for k, v in spec.items() if k != "_target_"} if isinstance(spec, Mapping) else {}
    unknown = sorted(set(own) - set(accepted))
    if unknown:
        raise ValueError(
            f"sampler {cls.__name__} has no option {', '.join(unknown)}; its options: "
            f"{', '.join(accepted) or 'none'}"
        )
    given = {k: v for k, v in options.items() if k in accepted and v is not None}
    return cls(**{**given, **own})


def _check_args(
    eta: float | None, variance: str, shape: Sequence[int], x_T: Tensor | None
) -> None:
    check_variance(variance)
    if eta is not None:
        check_eta(eta)
    if x_T is not None and tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T has shape {tuple(x_T.shape)} but shape={tuple(shape)}")


def _process(
    schedule: NoiseSchedule | None, prediction: str, process: NoiseProcess | None
) -> NoiseProcess:
    """The process to sample: ``process``, else the DDPM chain of ``schedule``."""
    if process is not None:
        return process
    if schedule is None:
        raise ValueError(
            "sample() needs a schedule (DDPM) or a process (ldm_lightning.diffusion.processes)"
        )
    check_prediction(prediction)
    return DDPMProcess(schedule, prediction)


def sample(
    model_fn: ModelFn,
    shape: Sequence[int],
    schedule: NoiseSchedule | None = None,
    sampler: str | Mapping[str, Any] | Sampler = "ddim",
    steps: int | None = 50,
    eta: float | None = None,
    prediction: str = "eps",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    x_T: Tensor | None = None,
    clip_denoised: bool = False,
    variance: str = "fixed_small",
    progress: bool = False,
    return_trajectory: bool = False,
    timestep_spacing: str | None = None,
    process: NoiseProcess | None = None,
    guide: Guide | None = None,
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Draw samples by running the reverse process from noise.

    Args:
        model_fn: ``model_fn(input [B, ...], time [B]) -> [B, ...]``, the network as the process
            calls it (:meth:`~ldm_lightning.diffusion.processes.NoiseProcess.network_input`):
            for DDPM ``(x_t, t)`` with integer timesteps, predicting ``prediction`` ("eps" | "v"
            | "x0"); wrap it with classifier-free guidance if wanted.
        shape: (B, C, H, W) or any (B, ...) shape of the samples.
        schedule: the training noise schedule of a DDPM model (with ``prediction``); or give
            ``process``.
        sampler: "ddpm" (ancestral, DDPM Algorithm 2), "ddim" (DDIM eq. 12), "dpmpp_2m"
            (DPM-Solver++(2M), deterministic), "euler", "heun" (EDM Algorithms 2 and 1),
            "euler_ancestral" or another name of :data:`SAMPLERS`; or a
            ``{_target_: ..., **options}`` dict, or a :class:`Sampler` (:func:`make_sampler`).
        steps: number of steps (model evaluations, two per step for Heun but the last); ``None``
            runs all ``schedule.timesteps`` of a DDPM schedule (T, which "dpmpp_2m" allows only
            with "trailing": see :func:`inference_timesteps`).
        eta: the share of fresh noise per step, for DDIM (0 deterministic, 1 matches DDPM's
            posterior variance) and Euler ancestral. Like ``variance``, it goes to the samplers
            that take it, unless a dict or a Sampler sets it; None: each sampler's own default
            (DDIM 0, Euler ancestral 1).
        generator: source of all random numbers (see module docstring).
        device: where to sample; defaults to ``x_T``'s device, else the CPU.
        x_T: [B, ...] starting point instead of drawing it (noise scaled by the process's
            :meth:`~ldm_lightning.diffusion.processes.NoiseProcess.initial_scale`).
        clip_denoised: clamp predicted x0 to [-1, 1] before each step (pixel-space data).
        variance: DDPM's reverse variance, "fixed_small" (beta_tilde) or "fixed_large" (beta).
        progress: show a tqdm progress bar.
        return_trajectory: also return the predicted x0 of every step.
        timestep_spacing: the grid, one of the process's ``spacings`` (DDPM: "leading" |
            "trailing" | "linspace" | "karras", see :func:`inference_timesteps`); None: the
            process's default ("trailing" for DDPM).
        process: the noise process (:mod:`~ldm_lightning.diffusion.processes`) instead of
            ``schedule`` and ``prediction``.
        guide: ``guide(x, level, x0, eps) -> (x0, eps)`` applied to every estimate (classifier
            guidance, :func:`~ldm_lightning.diffusion.guidance.classifier_guidance`).

    Returns:
        x0 samples [B, ...] float32, or (x0, [predicted x0 [B, ...] per step]) with
        ``return_trajectory``.
    """
    _check_args(eta, variance, shape, x_T)
    rule = make_sampler(sampler, eta=eta, variance=variance)
    process = _process(schedule, prediction, process)
    if steps is None:
        if not isinstance(process, DDPMProcess):
            raise ValueError(
                f"steps=None (all timesteps) needs the DDPM process, not {process.name}"
            )
        steps = process.schedule.timesteps
    levels = process.sampling_levels(steps, timestep_spacing, zero_endpoint=rule.zero_endpoint)
    if device is None:
        device = x_T.device if x_T is not None else torch.device("cpu")
    process = process.to(device)
    noise_device = generator.device if generator is not None else torch.device("cpu")

    def noise() -> Tensor:
        return torch.randn(tuple(shape), generator=generator, device=noise_device).to(device)

    def denoise(x: Tensor, level: NoiseLevel) -> tuple[Tensor, Tensor]:
        t = torch.full((shape[0],), level.t, dtype=torch.float32, device=device)
        network_input, time = process.network_input(x, t)
        x0, eps = process.denoise(model_fn(network_input, time).float(), x, t)
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
            eps = (x - level.alpha * x0) / level.sigma
        return guide(x, level, x0, eps) if guide is not None else (x0, eps)

    pairs = list(zip(levels[:-1], levels[1:], strict=True))
    iterator = pairs
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(pairs, desc=f"{rule.name} sampling")

    trajectory: list[Tensor] = []
    rule.reset()
    with torch.no_grad():
        if x_T is None:
            x = noise() * process.initial_scale(levels[0])
        else:
            x = x_T.to(device=device, dtype=torch.float32)
        for t, s in iterator:
            x0, eps = denoise(x, t)
            x_s = rule.step(x, x0, eps, t, s, noise)
            if rule.order == 2 and not s.clean:
                x_s = rule.correct(x, x0, eps, x_s, *denoise(x_s, s), t, s)
            x = x_s
            if return_trajectory:
                trajectory.append(x0)
    return (x, trajectory) if return_trajectory else x
