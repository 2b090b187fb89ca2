"""Euler, Heun and Euler ancestral (and DPM-Solver++(2M) on EDM) against diffusers' schedulers,
on every process, driven by the same model from the same x_T with the same step noise.

**Frames.** diffusers' Euler-family schedulers hold the solver's variable y = x / f of
ldm_lightning/diffusion/processes/: on the DDPM chain the variance-exploding x_hat = x / alpha
(``init_noise_sigma`` and ``scale_model_input``, which divides by sqrt(sigma_hat^2 + 1) = 1 / alpha
and so hands the model our x); for flow and EDM x itself (f = 1). Both loops therefore start from
one draw: diffusers' ``randn * init_noise_sigma`` is y_T, ours ``x_T = f_T y_T``, and the final
states (f = 1 at the clean level) are compared directly. The step noise of Euler ancestral is drawn
from one generator per side, seeded alike, after x_T and once per step, in the same order
(diffusers' last draw, scaled by sigma_up = 0, comes after ours end).

**Grids** (T = 1000 training timesteps):

- DDPM "leading" and "trailing" are the same timesteps. diffusers' Euler-family "linspace" neither
  rounds ``linspace(0, T - 1, steps)`` to whole timesteps (as ``DDPMScheduler`` and ours do) nor
  interpolates log sigma_hat between them (it interpolates sigma_hat linearly): the grids agree
  where the linspace is whole, (T - 1) % (steps - 1) == 0, e.g. 28 steps, which the tests use.
- ``use_karras_sigmas=True`` takes sigma_min and sigma_max from the ends of the spacing's grid,
  the schedule's ends with the default "linspace", as our ``timestep_spacing="karras"``, and maps
  each sigma to a fractional timestep by interpolating log sigma_hat, as ours. diffusers'
  ``EulerAncestralDiscreteScheduler`` has no Karras sigmas and no x0 ("sample") prediction.
- Flow: ``FlowMatchEulerDiscreteScheduler.set_timesteps(steps)`` shifts a grid whose low end,
  ``sigma_min``, is already shifted (shift(shift(1 / T))), so with shift != 1 its grid is not
  our linspace(1, 1/T, steps) shifted once; given ``sigmas=linspace(1, 1/T, steps)`` it is, and
  that is the grid compared with shift 3. ``FlowMatchHeunDiscreteScheduler`` takes no sigmas:
  shift 1 only. Euler ancestral has no flow counterpart: ``LTXEulerAncestralRFScheduler``
  (ComfyUI's ``sample_euler_ancestral_RF``) steps down to sigma_s^2 / sigma_t in flow time, not in
  sigma / alpha, a different step, and ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=
  True)`` draws all the noise afresh; test_samplers_every_process.py checks ours in distribution.
- EDM: ``EDMEulerScheduler`` and ``EDMDPMSolverMultistepScheduler`` with
  ``prediction_type="epsilon"`` are EDM's Table 1 preconditioning, D = c_skip x + c_out F(c_in x,
  c_noise), as our ``EDMProcess``; their timesteps are c_noise, ours ``time_scale * c_noise``, so
  the reference loop calls the model with 1000 times its timestep. diffusers has no EDM Heun or
  Euler ancestral (their steps are compared on the DDPM chain here, and on EDM in distribution
  and convergence order in test_samplers_every_process.py).
"""

import inspect
from collections.abc import Callable

import numpy as np
import pytest
import torch
from diffusers import (
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    HeunDiscreteScheduler,
)

from ldm_lightning.diffusion import NoiseSchedule, sample
from ldm_lightning.diffusion.processes import DDPMProcess, EDMProcess, FlowProcess, NoiseProcess
from tests.diffusion.test_samplers_vs_diffusers import (
    DIFFUSERS_PREDICTION,
    SHAPE,
    exact_abar,
    toy_denoiser,
)

DDPM_SCHEDULERS = {
    "euler": EulerDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "euler_ancestral": EulerAncestralDiscreteScheduler,
}
# (sampler, spacing, steps): every spacing of each scheduler ("linspace" at a whole-timestep
# step count, see the module docstring), and 15 steps, which do not divide T.
DDPM_CASES = [
    (sampler, spacing, steps)
    for sampler in DDPM_SCHEDULERS
    for spacing, steps in [("leading", 20), ("trailing", 15), ("linspace", 28), ("karras", 20)]
    if not (sampler == "euler_ancestral" and spacing == "karras")
]


def run_scheduler(
    scheduler, model: Callable, generator: torch.Generator, time_scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """diffusers' pipeline loop after ``set_timesteps``: (y_T, final sample, model times)."""
    y_T = torch.randn(SHAPE, generator=generator) * getattr(scheduler, "init_noise_sigma", 1.0)
    scale_input = getattr(scheduler, "scale_model_input", lambda y, t: y)
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    step_kwargs = {"generator": generator} if takes_generator else {}
    y, times = y_T, []
    with torch.no_grad():
        for t in scheduler.timesteps:
            times.append(time_scale * float(t))
            out = model(scale_input(y, t), (time_scale * t).expand(SHAPE[0]))
            y = scheduler.step(out, t, y, **step_kwargs).prev_sample
    return y_T, y, times


def run_ours(
    process: NoiseProcess, sampler: str, steps: int, y_T: torch.Tensor, seed: int, **kwargs
) -> tuple[torch.Tensor, list[float]]:
    """Our samples from x_T = f_T y_T, with the generator past its x_T draw (module docstring),
    and the times the model was called at."""
    frame = process.sampling_levels(steps, kwargs.get("timestep_spacing"))[0].frame
    generator = torch.Generator().manual_seed(seed)
    torch.randn(SHAPE, generator=generator)  # diffusers' y_T
    times: list[float] = []

    def model(x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        times.append(float(time[0]))
        return toy_denoiser(x, time)

    x = sample(
        model,
        SHAPE,
        sampler=sampler,
        steps=steps,
        process=process,
        x_T=frame * y_T,
        generator=generator,
        **kwargs,
    )
    return x, times


def assert_same_run(ours: tuple, theirs: tuple) -> None:
    """Same model times and the same final samples to float32 rounding (measured: at most 7e-7
    of the largest sample; the toy eps model's x0 estimates reach ~200 where alpha is small)."""
    (x, times), (_, x_ref, times_ref) = ours, theirs
    np.testing.assert_allclose(times, times_ref, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(x, x_ref, rtol=5e-6, atol=5e-6 * float(x_ref.abs().max()))


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize(("sampler", "spacing", "steps"), DDPM_CASES)
def test_ddpm_process_matches(sampler: str, spacing: str, steps: int, prediction: str):
    """``sampler="euler_ancestral"`` by name, without ``eta``, must be ancestral (eta = 1)."""
    schedule = NoiseSchedule.make("linear")
    karras = spacing == "karras"
    scheduler = DDPM_SCHEDULERS[sampler](
        num_train_timesteps=1000,
        beta_schedule="linear",
        prediction_type=DIFFUSERS_PREDICTION[prediction],
        timestep_spacing="linspace" if karras else spacing,
        **({"use_karras_sigmas": True} if karras else {}),
    )
    exact_abar(scheduler, schedule).set_timesteps(steps)
    theirs = run_scheduler(scheduler, toy_denoiser, torch.Generator().manual_seed(4))
    process = DDPMProcess(schedule, prediction)
    ours = run_ours(process, sampler, steps, theirs[0], seed=4, timestep_spacing=spacing)
    assert_same_run(ours, theirs)


@pytest.mark.parametrize(
    ("sampler", "shift", "steps"),
    [("euler", 1.0, 20), ("euler", 3.0, 20), ("heun", 1.0, 12), ("heun", 3.0, 12)],
)
def test_flow_process_matches(sampler: str, shift: float, steps: int):
    """On diffusers' own grid for the shift (``set_timesteps(steps)``, which shifts a grid whose
    low end 1/T is shifted already, as SD3's reference sampler does)."""
    scheduler_class = (
        FlowMatchEulerDiscreteScheduler if sampler == "euler" else FlowMatchHeunDiscreteScheduler
    )
    scheduler = scheduler_class(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(steps)
    theirs = run_scheduler(scheduler, toy_denoiser, torch.Generator().manual_seed(2))
    ours = run_ours(FlowProcess(shift=shift), sampler, steps, theirs[0], seed=2)
    assert_same_run(ours, theirs)


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
@pytest.mark.parametrize(
    ("sampler", "steps"), [("euler", 10), ("euler", 25), ("dpmpp_2m", 10), ("dpmpp_2m", 25)]
)
def test_edm_process_matches(sampler: str, steps: int, sigma_data: float):
    """DPM-Solver++(2M): ``solver_order=2``, ``algorithm_type="dpmsolver++"``, midpoint, first
    order on the first step and on the step to sigma = 0 (``final_sigmas_type="zero"``)."""
    config = {"sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": sigma_data, "rho": 7.0}
    if sampler == "euler":
        scheduler = EDMEulerScheduler(prediction_type="epsilon", **config)
    else:
        scheduler = EDMDPMSolverMultistepScheduler(
            prediction_type="epsilon",
            solver_order=2,
            algorithm_type="dpmsolver++",
            solver_type="midpoint",
            final_sigmas_type="zero",
            **config,
        )
    scheduler.set_timesteps(steps)
    theirs = run_scheduler(
        scheduler, toy_denoiser, torch.Generator().manual_seed(1), time_scale=1000.0
    )
    process = EDMProcess(sigma_data=sigma_data, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    ours = run_ours(process, sampler, steps, theirs[0], seed=1)
    assert_same_run(ours, theirs)
