"""Noise processes (DDPM, flow, EDM) against closed forms, hand values, the papers' formulas
and diffusers' schedulers."""

import itertools
import math

import pytest
import torch
from diffusers import EDMEulerScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from ldm_lightning.diffusion.processes import (
    CLEAN,
    DDPMProcess,
    EDMProcess,
    FlowProcess,
    karras_sigmas,
)
from ldm_lightning.diffusion.schedules import NoiseSchedule

SD = {"kind": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
DRAWS = 20_000


def sd_ddpm(**kwargs) -> DDPMProcess:
    return DDPMProcess(NoiseSchedule.make(**SD), **kwargs)


def zts_ddpm(prediction: str) -> DDPMProcess:
    return DDPMProcess(NoiseSchedule.make(**SD, zero_terminal_snr=True), prediction=prediction)


# ---------------------------------------------------------------- the path x = alpha x0 + sigma eps
LINEAR_ABAR = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)


@pytest.mark.parametrize(
    ("make", "t", "alpha_sigma"),
    [
        (
            lambda: DDPMProcess(NoiseSchedule.make("linear")),
            [0, 250, 999],
            lambda t: (LINEAR_ABAR[t].sqrt().item(), (1 - LINEAR_ABAR[t]).sqrt().item()),
        ),
        (FlowProcess, [0.1, 0.5, 0.9], lambda t: (1 - t, t)),
        (EDMProcess, [0.01, 1.0, 80.0], lambda sigma: (1.0, sigma)),
    ],
    ids=["ddpm", "flow", "edm"],
)
def test_q_sample_marginals(make, t: list, alpha_sigma):
    """For fixed x0, q_sample over many noise draws has mean alpha x0 and std sigma."""
    n = 4000
    x0 = torch.linspace(-2, 2, 8)
    tt = torch.tensor(t).repeat_interleave(n)
    x = make().q_sample(x0.expand(len(tt), 8), tt, torch.randn(len(tt), 8)).view(len(t), n, 8)
    for i, ti in enumerate(t):
        alpha, sigma = alpha_sigma(ti)
        # 5 standard errors of the mean and of the std of n Gaussian draws
        torch.testing.assert_close(x[i].mean(0), alpha * x0, atol=5 * sigma / n**0.5, rtol=0)
        torch.testing.assert_close(
            x[i].std(0), torch.full((8,), sigma), atol=5 * sigma / (2 * n) ** 0.5, rtol=0
        )


def test_coefficients_hand_values():
    """DDPM: (sqrt(abar), sqrt(1 - abar)); flow: (1 - t, t); EDM: (1, sigma)."""
    ddpm = DDPMProcess(NoiseSchedule.make("linear", timesteps=3, beta_start=0.1, beta_end=0.3))
    abar = torch.tensor([0.9, 0.72, 0.504])
    alpha, sigma = ddpm.coefficients(torch.tensor([0, 1, 2]))
    torch.testing.assert_close(alpha, abar.sqrt())
    torch.testing.assert_close(sigma, (1 - abar).sqrt())

    alpha, sigma = FlowProcess().coefficients(torch.tensor([0.0, 0.25, 1.0]))
    torch.testing.assert_close(alpha, torch.tensor([1.0, 0.75, 0.0]))
    torch.testing.assert_close(sigma, torch.tensor([0.0, 0.25, 1.0]))

    alpha, sigma = EDMProcess().coefficients(torch.tensor([0.002, 1.0, 80.0]))
    torch.testing.assert_close(alpha, torch.ones(3))
    torch.testing.assert_close(sigma, torch.tensor([0.002, 1.0, 80.0]))


def test_ddpm_integral_t_gives_the_schedules_float32_values():
    process = DDPMProcess(NoiseSchedule.make("cosine"))
    s = process.schedule
    for t in (torch.arange(1000), torch.arange(1000, dtype=torch.float32)):
        alpha, sigma = process.coefficients(t)
        assert torch.equal(alpha, s.sqrt_alphas_cumprod)
        assert torch.equal(sigma, s.sqrt_one_minus_alphas_cumprod)


def test_ddpm_fractional_t_interpolates_log_sigma_over_alpha():
    """Between neighbouring timesteps alpha^2 + sigma^2 = 1 and log(sigma / alpha) is linear in t
    (what the karras grid's fractional timesteps mean)."""
    process = sd_ddpm()
    t = torch.tensor([0.5, 10.25, 500.75, 998.5], dtype=torch.float64)
    alpha, sigma = process.coefficients(t)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(4, dtype=torch.float64))

    def log_sigma_hat(i: int) -> float:
        abar = process.schedule.alpha_bar(i)
        return 0.5 * math.log((1 - abar) / abar)

    expected = [
        (1 - w) * log_sigma_hat(lo) + w * log_sigma_hat(lo + 1)
        for lo, w in ((0, 0.5), (10, 0.25), (500, 0.75), (998, 0.5))
    ]
    torch.testing.assert_close((sigma / alpha).log(), torch.tensor(expected, dtype=torch.float64))
    alpha32, _ = process.coefficients(t.float())
    assert alpha32.dtype == torch.float32
    torch.testing.assert_close(alpha32, alpha.float())


# ---------------------------------------------------------------- training targets and weights
@pytest.mark.parametrize(
    ("prediction", "target", "weight_gamma_1", "weight_gamma_5"),
    # abar = 0.64: alpha = 0.8, sigma = 0.6, SNR = 16/9; x0 = 2, eps = 1: v = 0.8 - 1.2.
    # min_snr: min(SNR, gamma) / SNR (eps), min(SNR, gamma) (x0), min(SNR, gamma) / (SNR + 1) (v)
    [("eps", 1.0, 9 / 16, 1.0), ("x0", 2.0, 1.0, 16 / 9), ("v", -0.4, 9 / 25, 16 / 25)],
)
def test_ddpm_target_weight_and_denoise_hand_values(
    prediction: str, target: float, weight_gamma_1: float, weight_gamma_5: float
):
    schedule = NoiseSchedule(torch.tensor([0.36]))
    t = torch.tensor([0])
    x0, eps = torch.tensor([[2.0]]), torch.tensor([[1.0]])
    process = DDPMProcess(schedule, prediction=prediction)
    x = process.q_sample(x0, t, eps)
    assert x.item() == pytest.approx(0.8 * 2 + 0.6)
    y = process.target(x0, eps, x, t)
    assert y.item() == pytest.approx(target)
    assert process.loss_weight(t).item() == 1.0
    for gamma, weight in ((1.0, weight_gamma_1), (5.0, weight_gamma_5)):
        min_snr = DDPMProcess(schedule, prediction, loss_weighting="min_snr", min_snr_gamma=gamma)
        assert min_snr.loss_weight(t).item() == pytest.approx(weight, rel=1e-6)
    x0_hat, eps_hat = process.denoise(y, x, t)
    assert (x0_hat.item(), eps_hat.item()) == pytest.approx((2.0, 1.0), rel=1e-6)


def test_flow_target_weight_and_denoise():
    """Target eps - x0 with weight 1; x0 = x - t v and eps = x + (1 - t) v undo it."""
    process = FlowProcess()
    t = torch.tensor([0.0, 0.3, 0.7, 1.0])
    x0, eps = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    x = process.q_sample(x0, t, eps)
    v = process.target(x0, eps, x, t)
    assert torch.equal(v, eps - x0)
    assert torch.equal(process.loss_weight(t), torch.ones(4))
    x0_hat, eps_hat = process.denoise(v, x, t)
    torch.testing.assert_close(x0_hat, x0, atol=1e-6, rtol=0)
    torch.testing.assert_close(eps_hat, eps, atol=1e-6, rtol=0)
    net_x, net_t = process.network_input(x, t)
    assert net_x is x
    torch.testing.assert_close(net_t, 1000 * t)


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_edm_target_weight_and_denoise(sigma_data: float):
    """Target (x0 - c_skip x) / c_out with weight lambda c_out^2 = 1, so that the F-space loss is
    EDM eq. 8's lambda ||D - x0||^2; D of the exact target is x0."""
    process = EDMProcess(sigma_data=sigma_data)
    sigma = torch.tensor([0.002, 0.5, 1.0, 80.0], dtype=torch.float64)
    x0 = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    eps = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    x = process.q_sample(x0, sigma, eps)
    total = (sigma**2 + sigma_data**2).view(-1, 1, 1, 1)
    s = sigma.view(-1, 1, 1, 1)
    c_skip, c_out = sigma_data**2 / total, s * sigma_data / total.sqrt()
    target = process.target(x0, eps, x, sigma)
    torch.testing.assert_close(target, (x0 - c_skip * x) / c_out)
    torch.testing.assert_close(process.loss_weight(sigma), torch.ones(4), atol=1e-6, rtol=0)
    x0_hat, eps_hat = process.denoise(target, x, sigma)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps, atol=1e-6, rtol=1e-6)

    output = torch.randn_like(x0)
    lam = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    d_loss = lam * (process.denoise(output, x, sigma)[0] - x0).square().sum((1, 2, 3))
    f_loss = process.loss_weight(sigma) * (output - target).square().sum((1, 2, 3))
    torch.testing.assert_close(f_loss, d_loss, rtol=1e-6, atol=0)

    net_x, net_t = process.network_input(x, sigma)
    torch.testing.assert_close(net_x, x / total.sqrt())
    torch.testing.assert_close(net_t, 1000 * sigma.log() / 4)


# ---------------------------------------------------------------- EDM (Karras et al. 2022)
@pytest.mark.parametrize(
    ("sigma_data", "sigma", "c_skip", "c_out", "c_in"),
    [
        # sigma = sigma_data: 1/2, sd / sqrt 2, 1 / (sd sqrt 2)
        (0.5, 0.5, 0.5, 0.5 / math.sqrt(2), 1 / (0.5 * math.sqrt(2))),
        (1.0, 1.0, 0.5, 1 / math.sqrt(2), 1 / math.sqrt(2)),
        # sqrt(sigma^2 + sd^2) = 1.25, 0.625, 1.3
        (1.0, 0.75, 1 / 1.5625, 0.75 / 1.25, 1 / 1.25),
        (0.5, 0.375, 0.25 / 0.390625, 0.1875 / 0.625, 1 / 0.625),
        (0.5, 1.2, 0.25 / 1.69, 0.6 / 1.3, 1 / 1.3),
    ],
)
def test_edm_preconditioning_table_1(
    sigma_data: float, sigma: float, c_skip: float, c_out: float, c_in: float
):
    got = EDMProcess(sigma_data=sigma_data).preconditioning(
        torch.tensor([sigma], dtype=torch.float64)
    )
    expected = (c_skip, c_out, c_in, math.log(sigma) / 4)
    assert [float(c) for c in got] == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(("p_mean", "p_std"), [(-1.2, 1.2), (0.4, 0.5)])
def test_edm_training_sigma_is_log_normal(p_mean: float, p_std: float):
    sigma = EDMProcess(p_mean=p_mean, p_std=p_std).draw_t(DRAWS, torch.Generator().manual_seed(1))
    assert sigma.shape == (DRAWS,) and bool((sigma > 0).all())
    log_sigma = sigma.log()
    assert log_sigma.mean().item() == pytest.approx(p_mean, abs=5 * p_std / DRAWS**0.5)
    assert log_sigma.std().item() == pytest.approx(p_std, abs=5 * p_std / (2 * DRAWS) ** 0.5)


def test_karras_sigmas_hand_values():
    """EDM eq. 5: rho = 1 spaces sigma evenly, rho = 2 evenly in sqrt(sigma)."""
    assert karras_sigmas(1.0, 5.0, 5, rho=1.0) == pytest.approx([5, 4, 3, 2, 1])
    assert karras_sigmas(1.0, 9.0, 3, rho=2.0) == pytest.approx([9, 4, 1])
    middle = ((80 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7
    assert karras_sigmas(0.002, 80.0, 3) == pytest.approx([80, middle, 0.002], rel=1e-12)
    assert karras_sigmas(0.002, 80.0, 1) == [80.0]


@pytest.mark.parametrize("steps", [10, 25])
def test_edm_grid_matches_diffusers(steps: int):
    ref = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0)
    ref.set_timesteps(steps)
    levels = EDMProcess(sigma_data=0.5).sampling_levels(steps)
    ours = torch.tensor([level.sigma for level in levels], dtype=torch.float64)
    torch.testing.assert_close(ours, ref.sigmas.double(), rtol=1e-6, atol=0)
    assert all(level.alpha == 1.0 and level.frame == 1.0 for level in levels)


# ---------------------------------------------------------------- flow (SD3, Esser et al. 2024)
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_logit_normal_draws(shift: float):
    """logit(t) ~ N(m, s^2); the shift adds log(shift) to logit(t) (SD3 eq. 23:
    t' / (1 - t') = shift t / (1 - t))."""
    process = FlowProcess(logit_mean=0.5, logit_std=0.8, shift=shift)
    t = process.draw_t(DRAWS, torch.Generator().manual_seed(2))
    assert bool(((t > 0) & (t < 1)).all())
    logit = torch.logit(t.double())
    assert logit.mean().item() == pytest.approx(0.5 + math.log(shift), abs=5 * 0.8 / DRAWS**0.5)
    assert logit.std().item() == pytest.approx(0.8, abs=5 * 0.8 / (2 * DRAWS) ** 0.5)


def test_flow_uniform_draws():
    """Kolmogorov-Smirnov distance to U(0, 1) below its 1 % critical value 1.63 / sqrt(n)."""
    t = FlowProcess(timestep_sampling="uniform").draw_t(DRAWS, torch.Generator().manual_seed(3))
    assert bool(((t >= 0) & (t < 1)).all())
    edf = (torch.arange(DRAWS) + 0.5) / DRAWS
    assert (t.sort().values - edf).abs().max().item() < 1.63 / DRAWS**0.5


def test_flow_shift_hand_values():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(FlowProcess(shift=3.0).shifted(t), t.new_tensor([0, 0.5, 0.75, 1]))
    torch.testing.assert_close(
        FlowProcess(shift=0.5).shifted(t), t.new_tensor([0, 1 / 7, 1 / 3, 1])
    )
    assert torch.equal(FlowProcess(shift=1.0).shifted(t), t)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 10, 28])
def test_flow_grid_matches_diffusers(shift: float, steps: int):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(steps)
    levels = FlowProcess(shift=shift).sampling_levels(steps)
    ours = torch.tensor([level.t for level in levels], dtype=torch.float64)
    torch.testing.assert_close(ours, ref.sigmas.double(), atol=1e-6, rtol=0)
    assert [level.sigma for level in levels] == [level.t for level in levels]
    assert all(level.frame == 1.0 and level.alpha == 1 - level.t for level in levels)


# ---------------------------------------------------------------- sampling grids
GRIDS = [
    (sd_ddpm, "trailing"),
    (sd_ddpm, "leading"),
    (sd_ddpm, "linspace"),
    (sd_ddpm, "karras"),
    (lambda: zts_ddpm("v"), "trailing"),
    (lambda: FlowProcess(shift=3.0), "linspace"),
    (EDMProcess, "karras"),
]


@pytest.mark.parametrize(("make", "spacing"), GRIDS)
def test_sampling_levels_decrease_to_clean(make, spacing: str):
    process = make()
    levels = process.sampling_levels(12, spacing)
    assert len(levels) == 13 and levels[-1] == CLEAN
    ratios = [level.sigma_hat for level in levels]
    assert all(a > b for a, b in itertools.pairwise(ratios)), ratios
    # variance preserving (DDPM), pure noise at t = 1 (flow), x0 + 80 eps (EDM)
    initial = {"ddpm": 1.0, "flow": 1.0, "edm": math.hypot(1, 80)}[process.name]
    assert process.initial_scale(levels[0]) == pytest.approx(initial, rel=1e-12)
    if process.name == "ddpm":
        for level in levels:
            assert level.alpha**2 + level.sigma**2 == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("make", [sd_ddpm, FlowProcess, EDMProcess])
def test_unknown_spacing_names_the_valid_ones(make):
    process = make()
    with pytest.raises(ValueError, match=", ".join(process.spacings)):
        process.sampling_levels(10, "cosine")


@pytest.mark.parametrize("steps", [2, 10, 50])
def test_ddpm_karras_grid(steps: int):
    """sigma_hat = sqrt((1 - abar) / abar) follows EDM eq. 5 between the schedule's ends, at the
    fractional timesteps of diffusers' EulerDiscreteScheduler(use_karras_sigmas=True)."""
    process = sd_ddpm()
    s = process.schedule
    levels = process.sampling_levels(steps, "karras")

    def sigma_hat(t: int) -> float:
        return math.sqrt((1 - s.alpha_bar(t)) / s.alpha_bar(t))

    expected = karras_sigmas(sigma_hat(0), sigma_hat(999), steps)
    assert [level.sigma_hat for level in levels[:-1]] == pytest.approx(expected, rel=1e-9)
    assert levels[0].t == 999.0

    ref = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", use_karras_sigmas=True
    )
    # diffusers accumulates abar in float32, which moves the times by up to 1e-3; give it ours
    ref.alphas_cumprod = torch.tensor([s.alpha_bar(t) for t in range(1000)], dtype=torch.float64)
    ref.set_timesteps(steps)
    ours = torch.tensor([level.t for level in levels[:-1]])
    torch.testing.assert_close(ours, ref.timesteps, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- zero terminal SNR
def test_zero_terminal_snr_refuses_eps_prediction():
    with pytest.raises(ValueError, match="prediction=v"):
        zts_ddpm("eps")


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_zero_terminal_snr_denoise_at_pure_noise(prediction: str):
    """At t = T-1, alpha = 0 and sigma = 1: x0 = -v (v-prediction) or the output itself, eps = x,
    without NaN."""
    process = zts_ddpm(prediction)
    t = torch.tensor([999, 999])
    alpha, sigma = process.coefficients(t)
    assert alpha.tolist() == [0.0, 0.0] and sigma.tolist() == [1.0, 1.0]
    x, output = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    x0, eps = process.denoise(output, x, t)
    assert torch.equal(x0, -output if prediction == "v" else output)
    assert torch.equal(eps, x)
    level = process.sampling_levels(10)[0]
    assert (level.t, level.alpha, level.sigma, level.sigma_hat) == (999.0, 0.0, 1.0, math.inf)


def test_zero_terminal_snr_refuses_karras_spacing():
    with pytest.raises(ValueError, match="karras needs a finite sigma_max"):
        zts_ddpm("v").sampling_levels(10, "karras")


# ---------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: sd_ddpm(prediction="epsilon"), "eps, v, x0"),
        (lambda: sd_ddpm(loss_weighting="p2"), "uniform, min_snr"),
        (lambda: sd_ddpm(loss_weighting="min_snr", min_snr_gamma=0.0), "min_snr_gamma > 0"),
        (lambda: sd_ddpm().sampling_levels(0), r"steps must be in \[1, 1000\]"),
        (lambda: sd_ddpm().sampling_levels(0, "karras"), "steps must be >= 1"),
        (lambda: FlowProcess(timestep_sampling="cosmap"), "uniform, logit_normal"),
        (lambda: FlowProcess(shift=0.0), "shift, logit_std, time_scale and num_train"),
        (lambda: FlowProcess(logit_std=-1.0), "must be > 0, got 1.0, -1.0"),
        (lambda: FlowProcess(time_scale=0.0), "must be > 0"),
        (lambda: FlowProcess(num_train_timesteps=0), "must be > 0"),
        (lambda: FlowProcess().sampling_levels(0), "steps must be >= 1"),
        (lambda: EDMProcess(sigma_data=0.0), "sigma_data=0.0"),
        (lambda: EDMProcess(p_std=-1.0), "p_std=-1.0"),
        (lambda: EDMProcess(rho=0.0), "rho=0.0"),
        (lambda: EDMProcess(time_scale=0.0), "time_scale=0.0"),
        (lambda: EDMProcess(sigma_min=0.0), "0 < sigma_min < sigma_max"),
        (lambda: EDMProcess(sigma_min=1.0, sigma_max=0.5), "0 < sigma_min < sigma_max"),
        (lambda: EDMProcess().sampling_levels(0), "steps must be >= 1"),
        (lambda: karras_sigmas(1.0, math.inf, 3), "0 < sigma_min < sigma_max < inf"),
    ],
)
def test_bad_arguments_name_the_problem(call, message: str):
    with pytest.raises(ValueError, match=message):
        call()


def test_ddpm_settings_given_to_another_process_are_named_as_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from ldm_lightning.diffusion.processes import make_process

    flow = {"_target_": "ldm_lightning.diffusion.processes.FlowProcess"}
    with caplog.at_level("WARNING"):
        assert isinstance(make_process(flow, prediction="v", loss_weighting="min_snr"), FlowProcess)
    assert "model.prediction=v and model.loss_weighting=min_snr apply to the ddpm process only" in (
        caplog.text
    )
    caplog.clear()
    with caplog.at_level("WARNING"):
        make_process(flow)  # the defaults: nothing to say
    assert caplog.text == ""
    assert isinstance(make_process(None, {"kind": "linear", "timesteps": 10}), DDPMProcess)


def test_sampling_without_a_chain_or_all_steps_of_a_continuous_process_says_what_to_give() -> None:
    from ldm_lightning.diffusion import sample

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)

    with pytest.raises(ValueError, match="needs a schedule \\(DDPM\\) or a process"):
        sample(model, (2, 3))
    with pytest.raises(ValueError, match="steps=None \\(all timesteps\\) needs the DDPM process"):
        sample(model, (2, 3), process=FlowProcess(), steps=None)
