"""The timestep grids of the DDPM chain's samplers (Lin et al. 2024, table 2), as diffusers'
schedulers compute them."""

from __future__ import annotations

import numpy as np

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


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
