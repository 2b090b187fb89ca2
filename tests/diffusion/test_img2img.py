"""Image-to-image (SDEdit): the ends of the strength range exactly, the middle against the closed
form of Gaussian data for every process and sampler, and against diffusers' DDIM img2img loop.

For x0 ~ N(mu, s^2) per dimension, SDEdit from a fixed image a noises it to x_t0 = alpha a +
sigma eps, x_t0 ~ N(alpha a, sigma^2), and with the exact denoiser:

- a deterministic sampler integrates the probability-flow ODE, which keeps x a fixed quantile of
  the marginal N(alpha mu, V), V = alpha^2 s^2 + sigma^2: x0 = mu + s (x_t0 - alpha mu) / sqrt(V),
  so x0 ~ N(mu + s alpha (a - mu) / sqrt(V), s^2 sigma^2 / V);
- an ancestral sampler draws from the posterior p(x0 | x_t0) = N(mu + alpha s^2 (x_t0 - alpha mu)
  / V, s^2 sigma^2 / V), so x0 ~ N(mu + alpha^2 s^2 (a - mu) / V, (alpha s^2 / V)^2 sigma^2 +
  s^2 sigma^2 / V).
"""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from ldm_lightning.diffusion import SAMPLERS, NoiseSchedule, sample
from ldm_lightning.diffusion.img2img import kept_levels
from ldm_lightning.diffusion.processes import CLEAN, FlowProcess
from tests.diffusion.test_samplers_every_process import MU, PROCESSES, STD, STEPS, exact_network
from tests.diffusion.test_samplers_vs_diffusers import SHAPE, exact_abar, toy_denoiser

A = torch.tensor([1.5, 1.0])  # the image to edit, away from MU
N = 4000
ANCESTRAL = ("ddpm", "euler_ancestral")
# Strengths whose first level has sigma / alpha ~ 1 (0.9-1.3), half-way between image and noise.
MIDDLE = {"ddpm": 0.3, "flow": 0.3, "edm": 0.4}


def edit(process: str, sampler: str, strength: float, steps: int = 10, n: int = 64,
         seed: int = 0, x_init: torch.Tensor | None = A) -> torch.Tensor:
    """``n`` samples [n, 2] of the exact model of N(MU, STD^2), from ``x_init`` (None: noise)."""
    return sample(
        exact_network(PROCESSES[process], MU, STD), (n, 2), sampler=sampler, steps=steps,
        process=PROCESSES[process], generator=torch.Generator().manual_seed(seed),
        x_init=None if x_init is None else x_init.expand(n, 2), strength=strength,
    )


@pytest.mark.parametrize("sampler", tuple(SAMPLERS))
@pytest.mark.parametrize("process", tuple(PROCESSES))
def test_strength_one_is_sampling_from_noise(process: str, sampler: str) -> None:
    """Same seed, same numbers: the image is forgotten, the generator consumed alike."""
    assert torch.equal(edit(process, sampler, 1.0), edit(process, sampler, 1.0, x_init=None))


@pytest.mark.parametrize("sampler", tuple(SAMPLERS))
@pytest.mark.parametrize("process", tuple(PROCESSES))
def test_strength_zero_returns_the_image_and_draws_nothing(process: str, sampler: str) -> None:
    calls = []

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(t)
        return x

    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    x = sample(model_fn, (3, 2), sampler=sampler, steps=10, process=PROCESSES[process],
               generator=generator, x_init=A.expand(3, 2), strength=0.0)
    assert torch.equal(x, A.expand(3, 2)) and calls == []
    assert torch.equal(generator.get_state(), state)


@pytest.mark.parametrize(("strength", "kept"), [(0.6, 30), (0.01, 1), (0.3, 15), (1.0, 50),
                                                (0.0, 0), (0.99, 50), (0.61, 31)])
def test_kept_levels_are_the_last_ceil_of_strength_steps(strength: float, kept: int) -> None:
    levels = PROCESSES["ddpm"].sampling_levels(50)
    assert kept_levels(levels, strength) == levels[50 - kept:]
    assert kept_levels(levels, strength)[-1] == CLEAN


@pytest.mark.parametrize("sampler", ["ddim", "heun"])
def test_the_start_is_the_image_noised_to_the_first_kept_level(sampler: str) -> None:
    """x_t0 = alpha a + sigma eps with eps the generator's first draw; the first model call is
    at t0, and a first-order sampler calls the model once per kept level."""
    process = FlowProcess(shift=3.0)
    calls = []

    def model_fn(x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        calls.append((x, time))
        return torch.zeros_like(x)

    sample(model_fn, (4, 2), sampler=sampler, steps=10, process=process,
           generator=torch.Generator().manual_seed(3), x_init=A.expand(4, 2), strength=0.35)
    t0 = process.level(process.sampling_times(10, "linspace", False)[6])
    eps = torch.randn(4, 2, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(calls[0][0], t0.alpha * A + t0.sigma * eps)
    torch.testing.assert_close(calls[0][1], torch.full((4,), 1000 * t0.t))
    assert len(calls) == (4 if sampler == "ddim" else 7)  # Heun: two calls but on the last step


@pytest.mark.parametrize("sampler", tuple(STEPS))
@pytest.mark.parametrize("process", tuple(PROCESSES))
def test_edits_of_gaussian_data_follow_the_closed_form(process: str, sampler: str) -> None:
    """At :data:`MIDDLE` (module docstring); tolerance 4 standard errors, as for sampling."""
    steps, s = STEPS[sampler], STD.double()
    zero_endpoint = SAMPLERS[sampler].zero_endpoint
    levels = PROCESSES[process].sampling_levels(steps, zero_endpoint=zero_endpoint)
    t0 = kept_levels(levels, MIDDLE[process])[0]
    alpha, sigma, a, mu = t0.alpha, t0.sigma, A.double(), MU.double()
    v = alpha**2 * s**2 + sigma**2
    if sampler in ANCESTRAL:
        mean = mu + alpha**2 * s**2 * (a - mu) / v
        std = ((alpha * s**2 / v) ** 2 * sigma**2 + s**2 * sigma**2 / v).sqrt()
    else:
        mean, std = mu + s * alpha * (a - mu) / v.sqrt(), s * sigma / v.sqrt()
    x = edit(process, sampler, MIDDLE[process], steps=steps, n=N).double()
    assert ((mean - a).abs() > 0.1).all() and ((mean - mu).abs() > 0.1).all()  # a true middle
    assert ((x.mean(0) - mean).abs() < 4 * std / math.sqrt(N)).all(), (x.mean(0), mean)
    assert ((x.std(0) - std).abs() < 4 * std / math.sqrt(2 * N)).all(), (x.std(0), std)


def test_ddim_edit_matches_diffusers_img2img() -> None:
    """diffusers' img2img loop (StableDiffusionImg2ImgPipeline): timesteps[t_start:] with
    t_start = steps - int(strength steps), the image noised by ``add_noise`` at the first of
    them with the generator's first draw; 0.6 of 50 steps keeps 30 on both sides."""
    schedule = NoiseSchedule.make("linear")
    scheduler = exact_abar(DDIMScheduler(num_train_timesteps=1000, set_alpha_to_one=True,
                                         steps_offset=0, clip_sample=False), schedule)
    image = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    scheduler.set_timesteps(50)
    timesteps = scheduler.timesteps[50 - int(50 * 0.6):]
    generator = torch.Generator().manual_seed(0)
    x = scheduler.add_noise(image, torch.randn(SHAPE, generator=generator), timesteps[:1])
    for t in timesteps:
        x = scheduler.step(toy_denoiser(x, t.expand(SHAPE[0])), t, x).prev_sample
    ours = sample(toy_denoiser, SHAPE, schedule, sampler="ddim", steps=50,
                  generator=torch.Generator().manual_seed(0), timestep_spacing="leading",
                  x_init=image, strength=0.6)
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)


def test_bad_arguments_raise() -> None:
    process = PROCESSES["flow"]
    model_fn = exact_network(process, MU, STD)
    image = A.expand(2, 2)
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        sample(model_fn, (2, 2), process=process, x_init=image, strength=1.5)
    with pytest.raises(ValueError, match="strength=0.5 applies to image-to-image: give x_init"):
        sample(model_fn, (2, 2), process=process, strength=0.5)
    with pytest.raises(ValueError, match=r"x_init has shape \(2, 2\) but shape=\(3, 2\)"):
        sample(model_fn, (3, 2), process=process, x_init=image, strength=0.5)
    with pytest.raises(ValueError, match="give x_T .* or x_init .*, not both"):
        sample(model_fn, (2, 2), process=process, x_init=image, x_T=image, strength=0.5)
