"""Samplers driven by the exact denoiser of Gaussian data must return that Gaussian.

For x0 ~ N(mu, s^2) per dimension, x_t = a x0 + b eps (a = sqrt(abar_t), b = sqrt(1 - abar_t)) is
Gaussian with variance V = a^2 s^2 + b^2, and the posterior means (the MSE-optimal predictions) are

    E[eps | x_t] = b (x_t - a mu) / V,   E[x0 | x_t] = mu + a s^2 (x_t - a mu) / V,
    E[v | x_t] = a E[eps | x_t] - b E[x0 | x_t].

With N samples the sample mean has standard error s / sqrt(N) and the sample std s / sqrt(2N);
the tolerances are 4 standard errors, plus the solver's discretisation bias where few steps are
taken. That bias is real: even with the exact denoiser a 50-step DDIM returns a Gaussian ~5% too
narrow; test_convergence_order pins down how it shrinks with the number of steps.
"""

import itertools
import math

import pytest
import torch

from ldm_lightning.diffusion import NoiseSchedule, inference_timesteps, sample

N = 4000
MU = torch.tensor([1.0, -0.5])
STD = torch.tensor([0.5, 1.0])


def exact_predictor(schedule: NoiseSchedule, prediction: str, mu: torch.Tensor, std: torch.Tensor):
    """The Bayes-optimal model_fn for x0 ~ N(mu, diag(std^2)), samples shaped [B, D]."""

    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = schedule.alpha_bar(int(t[0]))  # samplers call with one timestep per batch
        a, b = math.sqrt(abar), math.sqrt(1 - abar)
        var = abar * std**2 + (1 - abar)
        residual = x_t - a * mu
        eps = b * residual / var
        x0 = mu + a * std**2 * residual / var
        return {"eps": eps, "x0": x0, "v": a * eps - b * x0}[prediction]

    return model_fn


@pytest.mark.parametrize(
    ("sampler", "kwargs", "prediction"),
    [
        ("ddpm", {"steps": None}, "eps"),
        ("ddim", {"steps": None, "eta": 0.0}, "v"),
        ("ddim", {"steps": None, "eta": 1.0}, "x0"),
        ("dpmpp_2m", {"steps": 100}, "eps"),
    ],
)
def test_gaussian_data_is_recovered(sampler: str, kwargs: dict, prediction: str):
    """Step counts where the discretisation error is below one standard error, so the tolerance
    is 4 standard errors of the sample mean and std."""
    schedule = NoiseSchedule.make("linear")
    model_fn = exact_predictor(schedule, prediction, MU, STD)
    x = sample(
        model_fn,
        (N, 2),
        schedule,
        sampler=sampler,
        prediction=prediction,
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )
    mean_tol = 4 * STD / math.sqrt(N)
    std_tol = 4 * STD / math.sqrt(2 * N)
    mean_err = (x.mean(0) - MU).abs()
    std_err = (x.std(0) - STD).abs()
    assert (mean_err < mean_tol).all(), f"mean error {mean_err} above {mean_tol}"
    assert (std_err < std_tol).all(), f"std error {std_err} above {std_tol}"


@pytest.mark.parametrize(
    ("sampler", "kwargs", "std_bias"),
    [
        ("ddim", {"steps": 50, "eta": 0.0}, 0.07),
        ("ddim", {"steps": 50, "eta": 1.0}, 0.13),
        ("dpmpp_2m", {"steps": 20}, 0.25),
    ],
)
def test_few_step_samplers(sampler: str, kwargs: dict, std_bias: float):
    """Few steps keep the mean within sampling error. The std carries the solvers' known bias,
    bounded relative to s: DDIM and respaced ancestral steps shrink it; DPM-Solver++(2M) on the
    "leading" grid, whose last interval spans a large log-SNR jump, overshoots."""
    schedule = NoiseSchedule.make("linear")
    x = sample(
        exact_predictor(schedule, "eps", MU, STD),
        (N, 2),
        schedule,
        sampler=sampler,
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )
    assert ((x.mean(0) - MU).abs() < 4 * STD / math.sqrt(N)).all()
    assert ((x.std(0) - STD).abs() < 4 * STD / math.sqrt(2 * N) + std_bias * STD).all()


@pytest.mark.parametrize(("sampler", "order"), [("ddim", 1), ("dpmpp_2m", 2)])
def test_convergence_order(sampler: str, order: int):
    """For Gaussian data with mu = 0 a deterministic sampler is linear in x_T: x = A x_T. The exact
    probability-flow ODE from tau_1 to tau_S followed by the final x0 prediction gives
    A* = sqrt(abar_S) s^2 / sqrt(V_S V_1). Doubling the steps must divide |A / A* - 1| by
    2^order: DDIM is first order, DPM-Solver++(2M) second order (Lu et al. 2022, sec. 4)."""
    schedule = NoiseSchedule.make("linear")
    std = torch.tensor([0.5, 1.0], dtype=torch.float64)
    model_fn = exact_predictor(schedule, "eps", torch.zeros(2), std.float())
    errors = []
    for steps in (40, 80, 160):
        timesteps = inference_timesteps(schedule.timesteps, steps, "leading")
        a_first, a_last = schedule.alpha_bar(timesteps[0]), schedule.alpha_bar(timesteps[-1])
        v_first, v_last = a_first * std**2 + 1 - a_first, a_last * std**2 + 1 - a_last
        exact = math.sqrt(a_last) * std**2 / (v_last * v_first).sqrt()
        gain = sample(
            model_fn, (1, 2), schedule, sampler=sampler, steps=steps, x_T=torch.ones(1, 2)
        )[0].double()
        errors.append((gain / exact - 1).abs())
    for coarse, fine in itertools.pairwise(errors):
        ratio = coarse / fine
        assert ((ratio > 0.85 * 2**order) & (ratio < 1.2 * 2**order)).all(), ratio


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize(
    ("sampler", "kwargs"),
    [("ddim", {"steps": 50}), ("dpmpp_2m", {"steps": 20}), ("ddpm", {"steps": 100})],
)
def test_point_mass_is_hit_exactly(sampler: str, kwargs: dict, prediction: str):
    """s = 0: every predicted x0 is mu and the final step returns it (also for ancestral DDPM)."""
    schedule = NoiseSchedule.make("cosine")
    model_fn = exact_predictor(schedule, prediction, MU, torch.zeros(2))
    x = sample(
        model_fn,
        (64, 2),
        schedule,
        sampler=sampler,
        prediction=prediction,
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )
    torch.testing.assert_close(x, MU.expand(64, 2), atol=1e-3, rtol=0)


def test_predictions_give_identical_samples():
    """With exact predictors, eps-, x0- and v-models are the same model: same seed, same samples."""
    schedule = NoiseSchedule.make("cosine")
    outs = [
        sample(
            exact_predictor(schedule, p, MU, STD),
            (256, 2),
            schedule,
            sampler="ddim",
            steps=25,
            eta=0.5,
            prediction=p,
            generator=torch.Generator().manual_seed(4),
        )
        for p in ("eps", "x0", "v")
    ]
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs[2], outs[0], atol=1e-4, rtol=1e-4)
