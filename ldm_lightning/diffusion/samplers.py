"""Reverse-process samplers: DDPM ancestral, DDIM, DPM-Solver++(2M).

Each algorithm is a :class:`Sampler`: its step rule, its options (constructor arguments) and
its ``name``, under which defining the class registers it in :data:`SAMPLERS`. A new sampler is
one such class, and one ``conf/model/sampler/<name>.yaml`` (its ``_target_`` and options) to
choose it from a config: ``model/sampler=<name>``.

Every sampler walks a decreasing subsequence tau_1 > ... > tau_S of training timesteps (see
:func:`inference_timesteps`), one model evaluation each, and ends with a step to abar = 1
(sigma = 0), i.e. the last step returns the model's prediction of x0 at tau_S. This is diffusers'
convention for ``DDPMScheduler``, ``DDIMScheduler(set_alpha_to_one=True)`` and
``DPMSolverMultistepScheduler(final_sigmas_type="zero")``.

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

Random numbers are drawn with ``torch.randn(..., generator=generator)`` on the generator's device
(CPU when no generator is given) and then moved, so one seed gives the same images on any device:
first x_T, then one draw per stochastic step, in the order diffusers' schedulers draw them.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ldm_lightning.diffusion.parameterization import check_prediction, predict_eps, predict_x0
from ldm_lightning.diffusion.schedules import NoiseSchedule
from ldm_lightning.utils.targets import resolve_class

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
VARIANCES = ("fixed_small", "fixed_large")

ModelFn = Callable[[Tensor, Tensor], Tensor]
Noise = Callable[[], Tensor]


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
    a multistep method remembers, before each run.
    """

    name: ClassVar[str]
    zero_endpoint: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            SAMPLERS[cls.name] = cls

    def reset(self) -> None:  # noqa: B027 - a one-step method has nothing to forget
        """Forget the previous run (:func:`sample` calls it before the first step)."""

    @abstractmethod
    def step(
        self, x: Tensor, x0: Tensor, eps: Tensor, a_t: float, a_s: float, noise: Noise
    ) -> Tensor:
        """x_s from x_t = ``x`` and the model's predictions ``x0``, ``eps`` at t, where
        ``a_t`` = abar_t and ``a_s`` = abar_s (1 on the last step); ``noise()`` draws z ~ N(0, I)
        of x's shape (see the module docstring)."""


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
        self, x: Tensor, x0: Tensor, eps: Tensor, a_t: float, a_s: float, noise: Noise
    ) -> Tensor:
        """A draw from the posterior q(x_s | x_t, x0) (DDPM eqs. 6-7); no noise on the step to
        abar_s = 1 (z = 0 at the end of Algorithm 2)."""
        beta = 1.0 - a_t / a_s
        mean = (a_s**0.5 * beta / (1.0 - a_t)) * x0 + (
            (1.0 - beta) ** 0.5 * (1.0 - a_s) / (1.0 - a_t)
        ) * x
        if a_s == 1.0:
            return mean
        var = beta * (1.0 - a_s) / (1.0 - a_t) if self.variance == "fixed_small" else beta
        return mean + var**0.5 * noise()


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021, "Denoising diffusion implicit models"): deterministic with
    ``eta`` = 0, DDPM's posterior variance with ``eta`` = 1."""

    name = "ddim"

    def __init__(self, eta: float = 0.0) -> None:
        check_eta(eta)
        self.eta = eta

    def step(
        self, x: Tensor, x0: Tensor, eps: Tensor, a_t: float, a_s: float, noise: Noise
    ) -> Tensor:
        """DDIM eq. 12: x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma^2) eps + sigma z, with
        sigma = eta sqrt((1 - abar_s)/(1 - abar_t)) sqrt(1 - abar_t/abar_s) (DDIM eq. 16)."""
        sigma = self.eta * ((1.0 - a_s) / (1.0 - a_t) * (1.0 - a_t / a_s)) ** 0.5
        x_s = a_s**0.5 * x0 + (1.0 - a_s - sigma**2) ** 0.5 * eps
        return x_s + sigma * noise() if sigma > 0 else x_s


def _lambda(a: float) -> float:
    """Half log-SNR lambda = log(alpha / sigma) of abar (DPM-Solver, Lu et al. 2022, sec. 3.1)."""
    return 0.5 * (np.log(a) - np.log1p(-a))


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
        self, x: Tensor, x0: Tensor, eps: Tensor, a_t: float, a_s: float, noise: Noise
    ) -> Tensor:
        """Data prediction, midpoint form:

            x_s = (sigma_s / sigma_t) x - alpha_s (e^{-h} - 1) (D0 + D1 / 2),
            D0 = x0_t, D1 = (x0_t - x0_prev) / r, r = h_prev / h, h = lambda_s - lambda_t.

        First order (DDIM) without history; the step to abar_s = 1 (sigma_s = 0, h = inf)
        returns x0_t, diffusers' ``lower_order_final`` with ``final_sigmas_type="zero"``.
        """
        if a_s == 1.0:
            return x0
        h = float(_lambda(a_s) - _lambda(a_t))
        sigma_ratio = ((1.0 - a_s) / (1.0 - a_t)) ** 0.5
        coef = -(a_s**0.5) * float(np.expm1(-h))
        d = x0 if self.x0_prev is None else x0 + (0.5 * h / self.h_prev) * (x0 - self.x0_prev)
        self.x0_prev, self.h_prev = x0, h
        return sigma_ratio * x + coef * d


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
    out, those of ``options`` its constructor takes (:func:`sample`'s ``eta`` and ``variance``)."""
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
    return cls(**{**{k: v for k, v in options.items() if k in accepted}, **own})


def _check_args(eta: float, variance: str, shape: Sequence[int], x_T: Tensor | None) -> None:
    check_variance(variance)
    check_eta(eta)
    if x_T is not None and tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T has shape {tuple(x_T.shape)} but shape={tuple(shape)}")


def sample(
    model_fn: ModelFn,
    shape: Sequence[int],
    schedule: NoiseSchedule,
    sampler: str | Mapping[str, Any] | Sampler = "ddim",
    steps: int | None = 50,
    eta: float = 0.0,
    prediction: str = "eps",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    x_T: Tensor | None = None,
    clip_denoised: bool = False,
    variance: str = "fixed_small",
    progress: bool = False,
    return_trajectory: bool = False,
    timestep_spacing: str = "leading",
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Draw samples by running the reverse process from x_T ~ N(0, I).

    Args:
        model_fn: ``model_fn(x_t [B, ...], t LongTensor [B]) -> [B, ...]`` predicting
            ``prediction`` ("eps" | "v" | "x0"); wrap it with classifier-free guidance if wanted.
        shape: (B, C, H, W) or any (B, ...) shape of the samples.
        schedule: the training noise schedule.
        sampler: "ddpm" (ancestral, DDPM Algorithm 2), "ddim" (DDIM eq. 12), "dpmpp_2m"
            (DPM-Solver++(2M), deterministic) or another name of :data:`SAMPLERS`; or a
            ``{_target_: ..., **options}`` dict, or a :class:`Sampler` (:func:`make_sampler`).
        steps: number of model evaluations; ``None`` runs all ``schedule.timesteps`` (T, which
            "dpmpp_2m" allows only with "trailing": see :func:`inference_timesteps`).
        eta: DDIM noise scale (0 deterministic, 1 matches DDPM's posterior variance). Like
            ``variance``, it goes to the samplers that take it, unless a dict or a Sampler
            sets it.
        generator: source of all random numbers (see module docstring).
        device: where to sample; defaults to ``x_T``'s device, else the schedule's.
        x_T: [B, ...] starting noise instead of drawing it.
        clip_denoised: clamp predicted x0 to [-1, 1] before each step (pixel-space data).
        variance: DDPM's reverse variance, "fixed_small" (beta_tilde) or "fixed_large" (beta).
        progress: show a tqdm progress bar.
        return_trajectory: also return the predicted x0 of every step.
        timestep_spacing: "leading" | "trailing" | "linspace", see :func:`inference_timesteps`.

    Returns:
        x0 samples [B, ...] float32, or (x0, [predicted x0 [B, ...] per step]) with
        ``return_trajectory``.
    """
    _check_args(eta, variance, shape, x_T)
    rule = make_sampler(sampler, eta=eta, variance=variance)
    check_prediction(prediction)
    n_steps = schedule.timesteps if steps is None else steps
    timesteps = inference_timesteps(
        schedule.timesteps, n_steps, timestep_spacing, zero_endpoint=rule.zero_endpoint
    )
    if device is None:
        device = x_T.device if x_T is not None else schedule.device
    schedule = schedule.to(device)
    noise_device = generator.device if generator is not None else torch.device("cpu")

    def noise() -> Tensor:
        return torch.randn(tuple(shape), generator=generator, device=noise_device).to(device)

    iterator = zip(timesteps, [*timesteps[1:], -1], strict=True)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=len(timesteps), desc=f"{rule.name} sampling")

    trajectory: list[Tensor] = []
    rule.reset()
    with torch.no_grad():
        x = noise() if x_T is None else x_T.to(device=device, dtype=torch.float32)
        for t, s in iterator:
            t_batch = torch.full((shape[0],), t, dtype=torch.long, device=device)
            out = model_fn(x, t_batch).float()
            x0 = predict_x0(out, x, t_batch, schedule, prediction)
            if clip_denoised:
                x0 = x0.clamp(-1.0, 1.0)
                eps = predict_eps(x0, x, t_batch, schedule, "x0")
            else:
                eps = predict_eps(out, x, t_batch, schedule, prediction)
            x = rule.step(x, x0, eps, schedule.alpha_bar(t), schedule.alpha_bar(s), noise)
            if return_trajectory:
                trajectory.append(x0)
    return (x, trajectory) if return_trajectory else x
