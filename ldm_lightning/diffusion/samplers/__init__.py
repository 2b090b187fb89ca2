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

from ldm_lightning.diffusion.samplers.base import (
    SAMPLERS,
    VARIANCES,
    Guide,
    ModelFn,
    Noise,
    Sampler,
    check_eta,
    check_variance,
    make_sampler,
    sampler_class,
)
from ldm_lightning.diffusion.samplers.loop import sample
from ldm_lightning.diffusion.samplers.rules import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverPP2MSampler,
    EulerAncestralSampler,
    EulerSampler,
    HeunSampler,
)
from ldm_lightning.diffusion.timesteps import TIMESTEP_SPACINGS, inference_timesteps

__all__ = [
    "SAMPLERS",
    "TIMESTEP_SPACINGS",
    "VARIANCES",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverPP2MSampler",
    "EulerAncestralSampler",
    "EulerSampler",
    "Guide",
    "HeunSampler",
    "ModelFn",
    "Noise",
    "Sampler",
    "check_eta",
    "check_variance",
    "inference_timesteps",
    "make_sampler",
    "sample",
    "sampler_class",
]
