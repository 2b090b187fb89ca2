"""Per-timestep weights of the denoising loss.

Min-SNR-gamma (Hang et al. 2023, "Efficient diffusion training via Min-SNR weighting strategy",
sec. 3.4) weights the x0-space loss by min(SNR_t, gamma). Expressed for the other targets, whose
squared errors are SNR_t (eps) and SNR_t + 1 (v) times the x0 error, the weights become

    eps: min(SNR_t, gamma) / SNR_t     x0: min(SNR_t, gamma)     v: min(SNR_t, gamma) / (SNR_t + 1)
"""

from __future__ import annotations

from torch import Tensor

from ldm_lightning.diffusion.parameterization import check_prediction
from ldm_lightning.diffusion.schedules import NoiseSchedule, extract

WEIGHTINGS = ("uniform", "min_snr")


def loss_weight(
    t: Tensor,
    schedule: NoiseSchedule,
    prediction: str,
    kind: str = "uniform",
    gamma: float = 5.0,
) -> Tensor:
    """Loss weight per sample, [B] float32 on ``t``'s device.

    Args:
        t: [B] integer timesteps. prediction: "eps" | "v" | "x0", the model's target.
        kind: "uniform" (all ones; L_simple, DDPM eq. 14) or "min_snr" (Min-SNR-gamma).
        gamma: the SNR clip of Min-SNR (the paper's default is 5).
    """
    check_prediction(prediction)
    if kind not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {kind!r}; choose one of: {', '.join(WEIGHTINGS)}")
    snr = extract(schedule.snr, t, 1)
    if kind == "uniform":
        return snr.new_ones(snr.shape)
    if gamma <= 0:
        raise ValueError(f"min_snr needs gamma > 0, got {gamma}")
    clipped = snr.clamp(max=gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "x0":
        return clipped
    return clipped / (snr + 1)
