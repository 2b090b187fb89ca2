"""Every sampler on every noise process, driven by the exact denoiser of known data.

For x0 ~ N(mu, diag(s^2)) and x = alpha x0 + sigma eps, x is Gaussian with variance V = alpha^2
s^2 + sigma^2 per dimension, and the MSE-optimal estimates are, for any (alpha, sigma),

    x0_hat = mu + alpha s^2 (x - alpha mu) / V,   eps_hat = (x - alpha x0_hat) / sigma;

s = 0 is a point mass at mu (x0_hat = mu). :func:`exact_network` is the network that outputs them
in each process's terms, called as the sampler calls it (``process.network_input``): DDPM
``(x, t)`` predicting eps, v = alpha eps - sigma x0 or x0; flow ``(x, 1000 t)`` predicting v =
eps - x0; EDM ``(c_in x, 1000 c_noise)`` predicting F = (x0 - c_skip x) / c_out (EDM Table 1).

With N samples the sample mean has standard error s / sqrt(N) and the sample std s / sqrt(2N);
the tolerance is 4 standard errors, at step counts where the discretisation bias is below ~1.5
of them (:data:`STEPS`). test_samplers_closed_form.py compares few-step accuracy with diffusers'.
"""

import itertools
import math

import pytest
import torch

from ldm_lightning.diffusion import SAMPLERS, NoiseSchedule, sample
from ldm_lightning.diffusion.processes import DDPMProcess, EDMProcess, FlowProcess, NoiseProcess
from ldm_lightning.diffusion.samplers import ModelFn

N = 4000
MU = torch.tensor([0.2, -0.5])
STD = torch.tensor([0.4, 1.0])
PROCESSES = {
    "ddpm": DDPMProcess(NoiseSchedule.make("linear"), prediction="v"),
    "flow": FlowProcess(shift=3.0),
    "edm": EDMProcess(sigma_data=0.5),
}
# Steps per sampler: the first-order samplers' std comes out ~4% small at 100 steps on every
# process here (as DDIM's on the DDPM chain), ~1.5% at 500; the second-order ones are within
# that with 100 model calls.
STEPS = {
    "ddpm": 500,
    "ddim": 500,
    "euler": 500,
    "euler_ancestral": 500,
    "dpmpp_2m": 100,
    "heun": 50,
}


def exact_network(process: NoiseProcess, mu: torch.Tensor, std: torch.Tensor) -> ModelFn:
    """The Bayes-optimal network for x0 ~ N(mu, diag(std^2)) under ``process``, samples [B, D]
    (module docstring); computed in float64."""

    def model_fn(network_input: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        x, t = network_input.double(), time.double()
        if isinstance(process, FlowProcess):
            t = t / process.time_scale
        elif isinstance(process, EDMProcess):
            t = torch.exp(4 * t / process.time_scale)  # sigma from c_noise = ln(sigma) / 4
            x = x * (t**2 + process.sigma_data**2).sqrt()[:, None]  # undo c_in
        alpha, sigma = (c[:, None] for c in process.coefficients(t))
        m, s = mu.double(), std.double()
        x0 = m + alpha * s**2 * (x - alpha * m) / (alpha**2 * s**2 + sigma**2)
        eps = (x - alpha * x0) / sigma
        if isinstance(process, DDPMProcess):
            output = {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[process.prediction]
        elif isinstance(process, FlowProcess):
            output = eps - x0
        else:
            sd2 = process.sigma_data**2
            c_skip, c_out = sd2 / (sigma**2 + sd2), sigma * sd2**0.5 / (sigma**2 + sd2).sqrt()
            output = (x0 - c_skip * x) / c_out
        return output.float()

    return model_fn


def draw(process: str, sampler: str, steps: int, std: torch.Tensor, n: int = N, seed: int = 0):
    """``n`` samples [n, 2] of N(MU, diag(std^2)) by ``sampler`` on ``PROCESSES[process]``."""
    return sample(
        exact_network(PROCESSES[process], MU, std),
        (n, 2),
        sampler=sampler,
        steps=steps,
        process=PROCESSES[process],
        generator=torch.Generator().manual_seed(seed),
    )


@pytest.mark.parametrize("sampler", tuple(STEPS))
@pytest.mark.parametrize("process", tuple(PROCESSES))
def test_gaussian_data_is_recovered(process: str, sampler: str):
    x = draw(process, sampler, STEPS[sampler], STD)
    mean_err, std_err = (x.mean(0) - MU).abs(), (x.std(0) - STD).abs()
    mean_tol, std_tol = 4 * STD / math.sqrt(N), 4 * STD / math.sqrt(2 * N)
    assert (mean_err < mean_tol).all(), f"mean error {mean_err} above {mean_tol}"
    assert (std_err < std_tol).all(), f"std error {std_err} above {std_tol}"


@pytest.mark.parametrize("sampler", tuple(STEPS))
@pytest.mark.parametrize("process", tuple(PROCESSES))
def test_point_mass_is_hit(process: str, sampler: str):
    """std = 0: every estimate of x0 is mu, and every sampler's last step returns it."""
    x = draw(process, sampler, 10, torch.zeros(2), n=64)
    torch.testing.assert_close(x, MU.expand(64, 2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("process", tuple(PROCESSES))
def test_euler_pairs_draw_the_same_samples(process: str):
    """On the same grid and noise, Euler is DDIM with eta = 0, and Euler ancestral is DDIM with
    eta = 1, which is DDPM's posterior step (diffusion/samplers/rules.py), on any process."""
    same = {"steps": 20, "std": STD, "n": 256}
    torch.testing.assert_close(draw(process, "euler", **same), draw(process, "ddim", **same))
    ancestral = draw(process, "euler_ancestral", **same)
    torch.testing.assert_close(ancestral, draw(process, "ddpm", **same))
    ddim_eta_one = sample(
        exact_network(PROCESSES[process], MU, STD),
        (256, 2),
        sampler={"_target_": "ldm_lightning.diffusion.samplers.DDIMSampler", "eta": 1.0},
        steps=20,
        process=PROCESSES[process],
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(ancestral, ddim_eta_one)


@pytest.mark.parametrize(("sampler", "order"), [("euler", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_edm_convergence_order(sampler: str, order: int):
    """For mu = 0 a deterministic sampler is linear in x_T: x = A x_T. The probability-flow ODE
    keeps x a fixed quantile of N(0, V), so from the first level of the grid (sigma_max) to the
    last evaluated one (sigma_min), followed by the x0 estimate there, the exact map is A* =
    alpha_last s^2 / sqrt(V_first V_last). On EDM's grid doubling the steps must divide |A / A* -
    1| by 2^order: Euler is first order, Heun (EDM Algorithm 1) and DPM-Solver++(2M) second."""
    std = torch.tensor([0.5, 1.0], dtype=torch.float64)
    process = PROCESSES["edm"]
    errors = []
    for steps in (40, 80, 160):
        levels = process.sampling_levels(steps)
        first, last = levels[0], levels[-2]
        v_first, v_last = (lv.alpha**2 * std**2 + lv.sigma**2 for lv in (first, last))
        exact = last.alpha * std**2 / (v_first * v_last).sqrt()
        gain = sample(
            exact_network(process, torch.zeros(2), std.float()),
            (1, 2),
            sampler=sampler,
            steps=steps,
            process=process,
            x_T=torch.ones(1, 2),
        )[0].double()
        errors.append((gain / exact - 1).abs())
    for coarse, fine in itertools.pairwise(errors):
        ratio = coarse / fine
        assert ((ratio > 0.85 * 2**order) & (ratio < 1.2 * 2**order)).all(), ratio


def test_every_sampler_is_covered():
    assert set(STEPS) == set(SAMPLERS)
