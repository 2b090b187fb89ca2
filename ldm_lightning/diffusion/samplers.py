"""Reverse-process samplers: DDPM ancestral, DDIM, DPM-Solver++(2M).

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

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ldm_lightning.diffusion.parameterization import check_prediction, predict_eps, predict_x0
from ldm_lightning.diffusion.schedules import NoiseSchedule

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
VARIANCES = ("fixed_small", "fixed_large")

ModelFn = Callable[[Tensor, Tensor], Tensor]


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


def _ddpm_step(
    x: Tensor,
    x0: Tensor,
    a_t: float,
    a_s: float,
    variance: str,
    noise: Callable[[], Tensor],
) -> Tensor:
    """Ancestral step x_t -> x_s from the posterior q(x_s | x_t, x0) (DDPM eqs. 6-7, Algorithm 2)
    of the respaced chain with beta' = 1 - abar_t / abar_s (improved DDPM sec. 4)."""
    beta = 1.0 - a_t / a_s
    mean = (a_s**0.5 * beta / (1.0 - a_t)) * x0 + (
        (1.0 - beta) ** 0.5 * (1.0 - a_s) / (1.0 - a_t)
    ) * x
    if a_s == 1.0:
        return mean
    var = beta * (1.0 - a_s) / (1.0 - a_t) if variance == "fixed_small" else beta
    return mean + var**0.5 * noise()


def _ddim_step(
    x0: Tensor, eps: Tensor, a_t: float, a_s: float, eta: float, noise: Callable[[], Tensor]
) -> Tensor:
    """DDIM eq. 12: x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma^2) eps + sigma z, with
    sigma = eta sqrt((1 - abar_s)/(1 - abar_t)) sqrt(1 - abar_t/abar_s) (DDIM eq. 16)."""
    sigma = eta * ((1.0 - a_s) / (1.0 - a_t) * (1.0 - a_t / a_s)) ** 0.5
    x_s = a_s**0.5 * x0 + (1.0 - a_s - sigma**2) ** 0.5 * eps
    return x_s + sigma * noise() if sigma > 0 else x_s


def _lambda(a: float) -> float:
    """Half log-SNR lambda = log(alpha / sigma) of abar (DPM-Solver, Lu et al. 2022, sec. 3.1)."""
    return 0.5 * (np.log(a) - np.log1p(-a))


def _dpmpp_2m_step(
    x: Tensor, x0: Tensor, x0_prev: Tensor | None, a_t: float, a_s: float, h_prev: float | None
) -> tuple[Tensor, float]:
    """DPM-Solver++(2M) step t -> s (Lu et al. 2022, Algorithm 2), data prediction, midpoint form:

        x_s = (sigma_s / sigma_t) x - alpha_s (e^{-h} - 1) (D0 + D1 / 2),
        D0 = x0_t, D1 = (x0_t - x0_prev) / r, r = h_prev / h, h = lambda_s - lambda_t.

    First order (DDIM) without history; the step to abar_s = 1 (sigma_s = 0, h = inf) returns
    x0_t, diffusers' ``lower_order_final`` with ``final_sigmas_type="zero"``. Returns (x_s, h).
    """
    if a_s == 1.0:
        return x0, float("inf")
    h = float(_lambda(a_s) - _lambda(a_t))
    sigma_ratio = ((1.0 - a_s) / (1.0 - a_t)) ** 0.5
    coef = -(a_s**0.5) * float(np.expm1(-h))
    d = x0 if x0_prev is None else x0 + (0.5 * h / h_prev) * (x0 - x0_prev)
    return sigma_ratio * x + coef * d, h


def _check_args(
    sampler: str,
    eta: float,
    variance: str,
    shape: Sequence[int],
    x_T: Tensor | None,
) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; choose one of: {', '.join(VARIANCES)}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like), got {eta}")
    if x_T is not None and tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T has shape {tuple(x_T.shape)} but shape={tuple(shape)}")


def sample(
    model_fn: ModelFn,
    shape: Sequence[int],
    schedule: NoiseSchedule,
    sampler: str = "ddim",
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
        sampler: "ddpm" (ancestral, DDPM Algorithm 2), "ddim" (DDIM eq. 12) or "dpmpp_2m"
            (DPM-Solver++(2M), deterministic).
        steps: number of model evaluations; ``None`` runs all ``schedule.timesteps`` (T, which
            "dpmpp_2m" allows only with "trailing": see :func:`inference_timesteps`).
        eta: DDIM noise scale (0 deterministic, 1 matches DDPM's posterior variance).
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
    _check_args(sampler, eta, variance, shape, x_T)
    check_prediction(prediction)
    n_steps = schedule.timesteps if steps is None else steps
    timesteps = inference_timesteps(
        schedule.timesteps, n_steps, timestep_spacing, zero_endpoint=sampler == "dpmpp_2m"
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

        iterator = tqdm(iterator, total=len(timesteps), desc=f"{sampler} sampling")

    trajectory: list[Tensor] = []
    x0_prev, h_prev = None, None
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
            a_t, a_s = schedule.alpha_bar(t), schedule.alpha_bar(s)
            if sampler == "ddpm":
                x = _ddpm_step(x, x0, a_t, a_s, variance, noise)
            elif sampler == "ddim":
                x = _ddim_step(x0, eps, a_t, a_s, eta, noise)
            else:
                x, h_prev = _dpmpp_2m_step(x, x0, x0_prev, a_t, a_s, h_prev)
                x0_prev = x0
            if return_trajectory:
                trajectory.append(x0)
    return (x, trajectory) if return_trajectory else x
