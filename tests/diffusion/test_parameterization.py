"""eps / x0 / v conversions (Salimans & Ho 2022, sec. 4) and loss weighting (Min-SNR-gamma)."""

import pytest
import torch

from ldm_lightning.diffusion import (
    PREDICTIONS,
    NoiseSchedule,
    loss_weight,
    predict_eps,
    predict_x0,
    target,
)

T_VALUES = torch.tensor([0, 3, 100, 500, 900, 999])


@pytest.fixture
def schedule() -> NoiseSchedule:
    return NoiseSchedule.make("cosine", timesteps=1000)


@pytest.fixture
def batch(schedule: NoiseSchedule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x0 = torch.randn(6, 3, 4, 4)
    noise = torch.randn(6, 3, 4, 4)
    return x0, noise, schedule.q_sample(x0, T_VALUES, noise)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_targets_convert_back_exactly(schedule: NoiseSchedule, batch, prediction: str):
    """The training target of each kind, fed back as a model output, recovers x0 and eps."""
    x0, noise, x_t = batch
    y = target(x0, noise, T_VALUES, schedule, prediction)
    recovered_x0 = predict_x0(y, x_t, T_VALUES, schedule, prediction)
    recovered_eps = predict_eps(y, x_t, T_VALUES, schedule, prediction)
    # eps -> x0 divides by alpha_t ~ 6e-3 at t = 999 and x0 -> eps by sigma_t ~ 1e-2 at t = 0;
    # compare only where the division is well conditioned, in float32 to 1e-5
    ok_x0 = slice(None) if prediction != "eps" else slice(0, 5)
    ok_eps = slice(None) if prediction != "x0" else slice(1, None)
    torch.testing.assert_close(recovered_x0[ok_x0], x0[ok_x0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recovered_eps[ok_eps], noise[ok_eps], atol=1e-5, rtol=1e-5)


def test_round_trips_through_all_parameterisations(schedule: NoiseSchedule, batch):
    """eps -> x0 -> v -> eps and back are the identity at float32 precision."""
    x0, noise, x_t = batch
    t = T_VALUES[1:5]
    x_t, noise = x_t[1:5], noise[1:5]
    x0_hat = predict_x0(noise, x_t, t, schedule, "eps")
    v_hat = target(x0_hat, noise, t, schedule, "v")
    eps_back = predict_eps(v_hat, x_t, t, schedule, "v")
    x0_back = predict_x0(v_hat, x_t, t, schedule, "v")
    torch.testing.assert_close(eps_back, noise, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x0_back, x0[1:5], atol=1e-5, rtol=1e-5)
    eps_from_x0 = predict_eps(x0_back, x_t, t, schedule, "x0")
    torch.testing.assert_close(eps_from_x0, noise, atol=1e-5, rtol=1e-5)


def test_v_hand_value():
    """abar = 0.64: alpha = 0.8, sigma = 0.6, v = 0.8 eps - 0.6 x0."""
    s = NoiseSchedule(torch.tensor([0.36]))
    t = torch.tensor([0])
    x0, eps = torch.tensor([[2.0]]), torch.tensor([[1.0]])
    assert target(x0, eps, t, s, "v").item() == pytest.approx(0.8 - 1.2)
    x_t = s.q_sample(x0, t, eps)
    assert x_t.item() == pytest.approx(0.8 * 2 + 0.6)
    assert predict_x0(torch.tensor([[-0.4]]), x_t, t, s, "v").item() == pytest.approx(2.0)
    assert predict_eps(torch.tensor([[-0.4]]), x_t, t, s, "v").item() == pytest.approx(1.0)


def test_min_snr_hand_values():
    """abar = (0.5, 0.9, 0.99): SNR = (1, 9, 99); gamma = 5 clips the last two."""
    s = NoiseSchedule(torch.tensor([0.01, 1 - 0.9 / 0.99, 1 - 0.5 / 0.9], dtype=torch.float64))
    t = torch.tensor([2, 1, 0])  # abar_t: 0.5, 0.9, 0.99
    snr = torch.tensor([1.0, 9.0, 99.0])
    torch.testing.assert_close(s.snr[t], snr, rtol=1e-5, atol=0)
    clipped = torch.tensor([1.0, 5.0, 5.0])
    expected = {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}
    for prediction, weights in expected.items():
        got = loss_weight(t, s, prediction, kind="min_snr", gamma=5.0)
        torch.testing.assert_close(got, weights, rtol=1e-5, atol=0)
        assert got.shape == (3,) and got.dtype == torch.float32
        torch.testing.assert_close(loss_weight(t, s, prediction), torch.ones(3))


def test_min_snr_equalises_x0_space_errors(schedule: NoiseSchedule, batch):
    """Weighted squared errors agree across parameterisations for the same x0 error."""
    x0, noise, x_t = batch
    t = T_VALUES
    x0_err = x0 + 0.1 * torch.randn_like(x0)
    losses = {}
    for prediction in PREDICTIONS:
        eps_hat = predict_eps(x0_err, x_t, t, schedule, "x0")
        pred = target(x0_err, eps_hat, t, schedule, prediction)
        err = (pred - target(x0, noise, t, schedule, prediction)).pow(2).mean(dim=(1, 2, 3))
        losses[prediction] = loss_weight(t, schedule, prediction, kind="min_snr") * err
    ok = slice(1, 5)  # well-conditioned timesteps in float32
    torch.testing.assert_close(losses["eps"][ok], losses["x0"][ok], rtol=1e-3, atol=0)
    torch.testing.assert_close(losses["v"][ok], losses["x0"][ok], rtol=1e-3, atol=0)


@pytest.mark.parametrize(
    "call",
    [
        lambda s, x, t: predict_x0(x, x, t, s, "score"),
        lambda s, x, t: predict_eps(x, x, t, s, "epsilon"),
        lambda s, x, t: target(x, x, t, s, "v_prediction"),
        lambda s, x, t: loss_weight(t, s, "sample"),
    ],
)
def test_unknown_prediction_lists_valid(schedule: NoiseSchedule, call):
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="eps, v, x0"):
        call(schedule, x, torch.tensor([0, 1]))


def test_unknown_weighting_and_bad_gamma(schedule: NoiseSchedule):
    t = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="uniform, min_snr"):
        loss_weight(t, schedule, "eps", kind="p2")
    with pytest.raises(ValueError, match="gamma > 0"):
        loss_weight(t, schedule, "eps", kind="min_snr", gamma=0.0)
