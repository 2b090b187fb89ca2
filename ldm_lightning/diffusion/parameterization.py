"""What the denoiser predicts: noise (eps), data (x0) or velocity (v), and conversions between them.

With x_t = alpha_t x0 + sigma_t eps, alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)
(DDPM eq. 4), the velocity is v = alpha_t eps - sigma_t x0 (Salimans & Ho 2022, "Progressive
distillation", sec. 4). Since alpha_t^2 + sigma_t^2 = 1 the three are linked by

    x0  = (x_t - sigma_t eps) / alpha_t  = alpha_t x_t - sigma_t v
    eps = (x_t - alpha_t x0) / sigma_t   = sigma_t x_t + alpha_t v
"""

from __future__ import annotations

from torch import Tensor

from ldm_lightning.diffusion.schedules import NoiseSchedule, extract

PREDICTIONS = ("eps", "v", "x0")


def check_prediction(prediction: str) -> None:
    """Raise a ValueError naming the valid parameterisations if ``prediction`` is not one."""
    if prediction not in PREDICTIONS:
        raise ValueError(
            f"unknown prediction {prediction!r}; choose one of: {', '.join(PREDICTIONS)}"
        )


def _alpha_sigma(schedule: NoiseSchedule, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    alpha = extract(schedule.sqrt_alphas_cumprod, t, like.ndim).to(like.dtype)
    sigma = extract(schedule.sqrt_one_minus_alphas_cumprod, t, like.ndim).to(like.dtype)
    return alpha, sigma


def x0_from(pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, prediction: str) -> Tensor:
    """The clean data implied by a model output at ``x_t = alpha x0 + sigma eps``: DDPM eq. 15
    for eps, ``x0 = alpha x_t - sigma v`` for v. ``alpha``, ``sigma`` broadcast against ``x_t``."""
    check_prediction(prediction)
    if prediction == "x0":
        return pred
    if prediction == "eps":
        return (x_t - sigma * pred) / alpha
    return alpha * x_t - sigma * pred


def eps_from(pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, prediction: str) -> Tensor:
    """The noise implied by a model output: ``(x_t - alpha x0) / sigma`` for x0,
    ``sigma x_t + alpha v`` for v."""
    check_prediction(prediction)
    if prediction == "eps":
        return pred
    if prediction == "x0":
        return (x_t - alpha * pred) / sigma
    return sigma * x_t + alpha * pred


def target_from(x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor, prediction: str) -> Tensor:
    """The regression target of ``prediction`` for ``x_t = alpha x0 + sigma noise``: ``noise``
    (DDPM eq. 14), ``x0``, or ``v = alpha noise - sigma x0`` (Salimans & Ho 2022, sec. 4)."""
    check_prediction(prediction)
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    return alpha * noise - sigma * x0


def predict_x0(
    pred: Tensor, x_t: Tensor, t: Tensor, schedule: NoiseSchedule, prediction: str
) -> Tensor:
    """:func:`x0_from` at the schedule's timesteps ``t`` [B]; ``pred``, ``x_t``: [B, ...]."""
    return x0_from(pred, x_t, *_alpha_sigma(schedule, t, x_t), prediction)


def predict_eps(
    pred: Tensor, x_t: Tensor, t: Tensor, schedule: NoiseSchedule, prediction: str
) -> Tensor:
    """:func:`eps_from` at the schedule's timesteps ``t`` [B]; ``pred``, ``x_t``: [B, ...]."""
    return eps_from(pred, x_t, *_alpha_sigma(schedule, t, x_t), prediction)


def target(
    x0: Tensor, noise: Tensor, t: Tensor, schedule: NoiseSchedule, prediction: str
) -> Tensor:
    """:func:`target_from` for ``x_t = q_sample(x0, t, noise)``; ``x0``, ``noise``: [B, ...],
    ``t``: [B] timesteps."""
    return target_from(x0, noise, *_alpha_sigma(schedule, t, x0), prediction)
