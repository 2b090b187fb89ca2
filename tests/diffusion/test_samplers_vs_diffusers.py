"""Full sampling trajectories against diffusers' schedulers driven by the same model and noise.

Conventions matched (see ldm_lightning/diffusion/samplers/): steps_offset=0, clip_sample=False,
DDIM with set_alpha_to_one=True (the last step lands on abar = 1), DPM-Solver++ with
final_sigmas_type="zero" and lower_order_final=True. Random draws come from one generator per
side seeded alike: x_T first, then one draw per stochastic step.

diffusers derives step coefficients such as beta_t = 1 - abar_t / abar_{t-1} from float32 abar,
which keeps only ~4 digits of beta_t near t = 0 and drifts ~1e-3 from float64 over 1000 DDPM
steps. The schedules themselves are compared in float32 in test_schedules.py; here diffusers is
handed the float64 abar (``exact_abar``) so that the comparison measures the algorithms to 1e-5.
"""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from ldm_lightning.diffusion import NoiseSchedule, inference_timesteps, sample

SHAPE = (2, 3, 8, 8)
DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
SCHEDULE_KINDS = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


def toy_denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed model, nonlinear in x and t, mixing channels and pixels (rolls instead of a conv:
    conv kernels are ~40x slower per call on a busy 2-core CPU and DDPM makes 1000 calls)."""
    bias = torch.tensor([0.1, -0.2, 0.05]).view(1, 3, 1, 1)
    mix = 0.7 * x - 0.4 * x.roll(1, dims=1) + 0.3 * x.roll(1, dims=-1) + bias
    phase = (t.float() / 1000).view(-1, 1, 1, 1)
    return torch.tanh(mix) + 0.1 * x + 0.05 * torch.sin(3 * phase)


@pytest.fixture(scope="module")
def model():
    return toy_denoiser


def exact_abar(scheduler, schedule: NoiseSchedule):
    """Give a diffusers scheduler our float64 abar_t (see module docstring)."""
    scheduler.alphas_cumprod = torch.tensor(
        [schedule.alpha_bar(t) for t in range(schedule.timesteps)], dtype=torch.float64
    )
    return scheduler


def run_diffusers(scheduler, model, num_steps, seed=0, **step_kwargs):
    """The standard diffusers loop; returns final sample and the list of predicted x0."""
    gen = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(num_steps)
    x = torch.randn(SHAPE, generator=gen)
    preds = []
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = model(x, t.expand(SHAPE[0]))
            result = scheduler.step(out, t, x, generator=gen, **step_kwargs)
            x = result.prev_sample
            preds.append(getattr(result, "pred_original_sample", None))
    return x, preds, [int(t) for t in scheduler.timesteps]


@pytest.mark.parametrize(
    ("kind", "prediction", "spacing", "steps"),
    [
        ("linear", "eps", "leading", 50),
        ("cosine", "v", "leading", 50),
        ("linear", "v", "trailing", 25),
        ("cosine", "x0", "trailing", 10),
    ],
)
def test_ddim_deterministic_matches(model, kind, prediction, spacing, steps):
    schedule = NoiseSchedule.make(kind)
    ref = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule=SCHEDULE_KINDS[kind],
        set_alpha_to_one=True,
        steps_offset=0,
        clip_sample=False,
        timestep_spacing=spacing,
        prediction_type=DIFFUSERS_PREDICTION[prediction],
    )
    x_ref, preds_ref, ts_ref = run_diffusers(exact_abar(ref, schedule), model, num_steps=steps)
    assert inference_timesteps(1000, steps, spacing) == ts_ref
    x, preds = sample(
        model,
        SHAPE,
        schedule,
        sampler="ddim",
        steps=steps,
        eta=0.0,
        prediction=prediction,
        generator=torch.Generator().manual_seed(0),
        timestep_spacing=spacing,
        return_trajectory=True,
    )
    assert len(preds) == steps
    for ours, theirs in zip(preds, preds_ref, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x, x_ref, atol=1e-5, rtol=1e-5)


def test_ddim_stochastic_matches_with_same_generator(model):
    schedule = NoiseSchedule.make("linear")
    ref = DDIMScheduler(
        num_train_timesteps=1000, set_alpha_to_one=True, steps_offset=0, clip_sample=False
    )
    x_ref, _, _ = run_diffusers(exact_abar(ref, schedule), model, num_steps=20, seed=7, eta=0.7)
    x = sample(
        model,
        SHAPE,
        schedule,
        sampler="ddim",
        steps=20,
        eta=0.7,
        generator=torch.Generator().manual_seed(7),
        timestep_spacing="leading",  # diffusers' default
    )
    torch.testing.assert_close(x, x_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("steps", "variance", "prediction", "spacing"),
    [
        (None, "fixed_small", "eps", "leading"),
        (40, "fixed_small", "v", "leading"),
        (40, "fixed_large", "eps", "leading"),
        (40, "fixed_small", "eps", "trailing"),
        (30, "fixed_small", "x0", "linspace"),
    ],
)
def test_ddpm_matches_with_same_generator(model, steps, variance, prediction, spacing):
    schedule = NoiseSchedule.make("linear")
    ref = DDPMScheduler(
        num_train_timesteps=1000,
        variance_type=variance,
        clip_sample=False,
        prediction_type=DIFFUSERS_PREDICTION[prediction],
        timestep_spacing=spacing,
    )
    x_ref, preds_ref, ts_ref = run_diffusers(
        exact_abar(ref, schedule), model, num_steps=steps or 1000, seed=3
    )
    x, preds = sample(
        model,
        SHAPE,
        schedule,
        sampler="ddpm",
        steps=steps,
        variance=variance,
        prediction=prediction,
        generator=torch.Generator().manual_seed(3),
        return_trajectory=True,
        timestep_spacing=spacing,
    )
    assert inference_timesteps(1000, steps or 1000, spacing) == ts_ref
    torch.testing.assert_close(preds[-1], preds_ref[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x, x_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize(
    ("kind", "prediction", "steps"),
    [
        ("linear", "eps", 50),
        ("cosine", "v", 20),
        ("linear", "x0", 10),
        ("cosine", "eps", 15),
        ("linear", "v", 7),
    ],
)
def test_dpmpp_2m_matches(model, kind, prediction, spacing, steps):
    """Every spacing on diffusers' own grid (steps + 1 points less t = 0 for "leading" and
    "linspace"): ``steps`` model calls at its timesteps, then a first-order step to sigma = 0.
    15 and 7 do not divide T."""
    schedule = NoiseSchedule.make(kind)
    ref = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_schedule=SCHEDULE_KINDS[kind],
        algorithm_type="dpmsolver++",
        solver_order=2,
        lower_order_final=True,
        final_sigmas_type="zero",
        timestep_spacing=spacing,
        prediction_type=DIFFUSERS_PREDICTION[prediction],
    )
    x_ref, _, ts_ref = run_diffusers(exact_abar(ref, schedule), model, num_steps=steps)
    assert inference_timesteps(1000, steps, spacing, zero_endpoint=True) == ts_ref
    x, preds = sample(
        model,
        SHAPE,
        schedule,
        sampler="dpmpp_2m",
        steps=steps,
        prediction=prediction,
        generator=torch.Generator().manual_seed(0),
        timestep_spacing=spacing,
        return_trajectory=True,
    )
    assert len(preds) == steps
    torch.testing.assert_close(x, x_ref, atol=1e-5, rtol=1e-5)


def test_ddim_eta_one_equals_ddpm(model):
    """DDIM with eta = 1 has DDPM's posterior mean and variance (DDIM sec. 4.1)."""
    kwargs = {"steps": 30, "return_trajectory": False}
    ddim = sample(
        model,
        SHAPE,
        NoiseSchedule.make("linear"),
        sampler="ddim",
        eta=1.0,
        generator=torch.Generator().manual_seed(5),
        **kwargs,
    )
    ddpm = sample(
        model,
        SHAPE,
        NoiseSchedule.make("linear"),
        sampler="ddpm",
        generator=torch.Generator().manual_seed(5),
        **kwargs,
    )
    torch.testing.assert_close(ddim, ddpm, atol=1e-4, rtol=1e-4)


def test_seed_gives_same_samples_and_x_T_is_used(model):
    s = NoiseSchedule.make("linear")
    a = sample(
        model, SHAPE, s, sampler="ddpm", steps=10, generator=torch.Generator().manual_seed(1)
    )
    b = sample(
        model, SHAPE, s, sampler="ddpm", steps=10, generator=torch.Generator().manual_seed(1)
    )
    c = sample(
        model, SHAPE, s, sampler="ddpm", steps=10, generator=torch.Generator().manual_seed(2)
    )
    assert torch.equal(a, b) and not torch.allclose(a, c)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    from_x_T = sample(model, SHAPE, s, sampler="ddim", steps=10, x_T=x_T)
    seeded = sample(
        model, SHAPE, s, sampler="ddim", steps=10, generator=torch.Generator().manual_seed(9)
    )
    torch.testing.assert_close(from_x_T, seeded, atol=0, rtol=0)


def test_inference_timesteps_hand_values():
    assert inference_timesteps(1000, 4, "leading") == [750, 500, 250, 0]
    assert inference_timesteps(1000, 4, "trailing") == [999, 749, 499, 249]
    assert inference_timesteps(1000, 4, "linspace") == [999, 666, 333, 0]
    assert inference_timesteps(10, 10, "leading") == list(range(9, -1, -1))
    assert inference_timesteps(1000, 4, "leading", zero_endpoint=True) == [800, 600, 400, 200]
    assert inference_timesteps(1000, 4, "trailing", zero_endpoint=True) == [999, 749, 499, 249]
    assert inference_timesteps(1000, 4, "linspace", zero_endpoint=True) == [999, 749, 500, 250]
    assert inference_timesteps(10, 9, "leading", zero_endpoint=True) == list(range(9, 0, -1))
    assert inference_timesteps(10, 10, "trailing", zero_endpoint=True) == list(range(9, -1, -1))


def test_trajectory_clipping_and_progress(model, capsys):
    s = NoiseSchedule.make("linear", timesteps=100)
    x, preds = sample(
        lambda x, t: 3.0 * model(x, t),
        SHAPE,
        s,
        sampler="ddim",
        steps=5,
        prediction="x0",
        clip_denoised=True,
        return_trajectory=True,
        progress=True,
        generator=torch.Generator().manual_seed(0),
    )
    assert len(preds) == 5 and all(p.shape == SHAPE for p in preds)
    assert all(p.abs().max() <= 1.0 for p in preds)
    torch.testing.assert_close(x, preds[-1])
    assert "ddim sampling" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sampler": "lms"}, "ddpm, ddim, dpmpp_2m, euler, heun, euler_ancestral"),
        ({"prediction": "epsilon"}, "eps, v, x0"),
        ({"timestep_spacing": "uniform"}, "leading, trailing, linspace, karras"),
        ({"steps": 0}, r"steps must be in \[1, 1000\]"),
        ({"steps": 1001}, r"steps must be in \[1, 1000\]"),
        (
            {"sampler": "dpmpp_2m", "steps": None, "timestep_spacing": "leading"},
            r"steps must be in \[1, 999\].*t = 0",
        ),
        ({"variance": "learned"}, "fixed_small, fixed_large"),
        ({"eta": -0.1}, "eta must be >= 0"),
        ({"x_T": torch.zeros(1, 3, 8, 8)}, "x_T has shape"),
    ],
)
def test_bad_arguments_name_the_fix(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample(model, SHAPE, NoiseSchedule.make("linear"), **kwargs)
