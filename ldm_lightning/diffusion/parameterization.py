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


def predict_x0(
    pred: Tensor, x_t: Tensor, t: Tensor, schedule: NoiseSchedule, prediction: str
) -> Tensor:
    """The clean data implied by a model output (DDPM eq. 15 for eps; x0 = alpha x_t - sigma v).

    Args:
        pred: [B, ...] model output of kind ``prediction``. x_t: [B, ...]. t: [B] timesteps.
    """
    check_prediction(prediction)
    if prediction == "x0":
        return pred
    alpha, sigma = _alpha_sigma(schedule, t, x_t)
    if prediction == "eps":
        return (x_t - sigma * pred) / alpha
    return alpha * x_t - sigma * pred


def predict_eps(
    pred: Tensor, x_t: Tensor, t: Tensor, schedule: NoiseSchedule, prediction: str
) -> Tensor:
    """The noise implied by a model output (eps = (x_t - alpha x0)/sigma = sigma x_t + alpha v).

    Args:
        pred: [B, ...] model output of kind ``prediction``. x_t: [B, ...]. t: [B] timesteps.
    """
    check_prediction(prediction)
    if prediction == "eps":
        return pred
    alpha, sigma = _alpha_sigma(schedule, t, x_t)
    if prediction == "x0":
        return (x_t - alpha * pred) / sigma
    return sigma * x_t + alpha * pred


def target(
    x0: Tensor, noise: Tensor, t: Tensor, schedule: NoiseSchedule, prediction: str
) -> Tensor:
    """Regression target for x_t = q_sample(x0, t, noise): ``noise`` (eps, DDPM eq. 14),
    ``x0``, or v = alpha_t noise - sigma_t x0 (Salimans & Ho 2022, sec. 4).

    Args:
        x0: [B, ...] clean data. noise: like ``x0``. t: [B] timesteps.
    """
    check_prediction(prediction)
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    alpha, sigma = _alpha_sigma(schedule, t, x0)
    return alpha * noise - sigma * x0
