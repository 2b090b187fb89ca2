"""Classifier-free guidance: the formula u + w (c - u), one doubled forward pass, and sampling."""

import pytest
import torch

from ldm_lightning.diffusion import NoiseSchedule, classifier_free_guidance, sample


class CountingModel(torch.nn.Module):
    """out = 0.5 x + 0.001 t + context.mean(tokens) (+ y): records every call's batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_sizes: list[int] = []

    def forward(self, x, t, context, y):
        self.batch_sizes.append(x.shape[0])
        shift = context.mean(dim=1).view(-1, x.shape[1], 1, 1) + y.view(-1, 1, 1, 1)
        return 0.5 * x + 0.001 * t.view(-1, 1, 1, 1).float() + shift


@pytest.fixture
def conditioning() -> tuple[dict, dict]:
    cond = {"context": torch.randn(3, 4, 2), "y": torch.tensor([1.0, 2.0, 3.0])}
    uncond = {"context": torch.zeros(3, 4, 2), "y": torch.zeros(3)}
    return cond, uncond


def test_formula_and_single_doubled_forward(conditioning):
    cond, uncond = conditioning
    model = CountingModel()
    x = torch.randn(3, 2, 5, 5)
    t = torch.tensor([10, 500, 999])
    guided = classifier_free_guidance(model, 4.0, cond, uncond)(x, t)
    assert model.batch_sizes == [6]

    base = 0.5 * x + 0.001 * t.view(-1, 1, 1, 1).float()
    u = base  # null context and null label shift by zero
    c = base + cond["context"].mean(1).view(3, 2, 1, 1) + cond["y"].view(3, 1, 1, 1)
    torch.testing.assert_close(guided, u + 4.0 * (c - u))
    # by hand for one element: u + 4 (c - u) = base + 4 * shift
    shift = cond["context"][0, :, 0].mean() + 1.0
    torch.testing.assert_close(guided[0, 0, 0, 0], base[0, 0, 0, 0] + 4 * shift)


def test_uncond_half_comes_first(conditioning):
    """scale = 0 returns the unconditional output: the first half of the doubled batch."""
    cond, uncond = conditioning
    model = CountingModel()
    x, t = torch.randn(3, 2, 5, 5), torch.tensor([1, 2, 3])
    out = classifier_free_guidance(model, 0.0, cond, uncond)(x, t)
    torch.testing.assert_close(out, model(x, t, **uncond))


def test_scale_one_is_a_plain_conditional_call(conditioning):
    cond, uncond = conditioning
    model = CountingModel()
    x, t = torch.randn(3, 2, 5, 5), torch.tensor([1, 2, 3])
    out = classifier_free_guidance(model, 1.0, cond, uncond)(x, t)
    assert model.batch_sizes == [3]
    torch.testing.assert_close(out, model(x, t, **cond))


def test_guided_sampling_calls_once_per_step(conditioning):
    cond, uncond = conditioning
    model = CountingModel()
    schedule = NoiseSchedule.make("linear", timesteps=100)
    model_fn = classifier_free_guidance(model, 3.0, cond, uncond)
    x = sample(
        model_fn,
        (3, 2, 5, 5),
        schedule,
        sampler="ddim",
        steps=7,
        generator=torch.Generator().manual_seed(0),
    )
    assert model.batch_sizes == [6] * 7
    assert x.shape == (3, 2, 5, 5) and torch.isfinite(x).all()


def test_mismatched_conditioning_is_rejected(conditioning):
    cond, uncond = conditioning
    with pytest.raises(ValueError, match="same keys"):
        classifier_free_guidance(CountingModel(), 2.0, cond, {"context": uncond["context"]})
    with pytest.raises(ValueError, match="must match"):
        classifier_free_guidance(
            CountingModel(), 2.0, cond, {"context": torch.zeros(1, 4, 2), "y": uncond["y"]}
        )


@pytest.mark.parametrize("phi", [0.3, 0.7, 1.0])
def test_guidance_rescale_matches_diffusers(conditioning, phi):
    """Lin et al. 2024 eqs. 15-17, against diffusers' rescale_noise_cfg on the same outputs."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    cond, uncond = conditioning
    model = CountingModel()
    x, t = torch.randn(3, 2, 5, 5), torch.tensor([10, 500, 999])
    rescaled = classifier_free_guidance(model, 5.0, cond, uncond, rescale=phi)(x, t)
    assert model.batch_sizes == [6]  # still one doubled pass
    u, c = model(x, t, **uncond), model(x, t, **cond)
    expected = rescale_noise_cfg(u + 5.0 * (c - u), c, guidance_rescale=phi)
    torch.testing.assert_close(rescaled, expected)


def test_full_rescale_gives_the_conditional_std_and_zero_is_plain(conditioning):
    cond, uncond = conditioning
    x, t = torch.randn(3, 2, 5, 5), torch.tensor([10, 500, 999])
    model = CountingModel()
    plain = classifier_free_guidance(model, 5.0, cond, uncond)(x, t)
    torch.testing.assert_close(
        classifier_free_guidance(model, 5.0, cond, uncond, rescale=0.0)(x, t), plain
    )
    full = classifier_free_guidance(model, 5.0, cond, uncond, rescale=1.0)(x, t)
    c = model(x, t, **cond)
    torch.testing.assert_close(full.flatten(1).std(1), c.flatten(1).std(1))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        classifier_free_guidance(model, 5.0, cond, uncond, rescale=1.5)


def test_guidance_interval_guides_only_inside_it(conditioning):
    """Kynkäänniemi et al. 2024: inside (lo, hi] the guided output (one doubled pass), outside
    the conditional one (one plain pass); the level is sigma / alpha of the call's time."""
    cond, uncond = conditioning
    model = CountingModel()
    x = torch.randn(3, 2, 5, 5)
    sigma_of_time = {100: 0.5, 500: 2.0, 900: 8.0}
    guided = classifier_free_guidance(
        model, 4.0, cond, uncond, interval=(1.0, 4.0),
        sigma_of_time=lambda t: torch.tensor([sigma_of_time[int(t[0])]]),
    )
    plain = classifier_free_guidance(model, 4.0, cond, uncond)
    for time, inside in ((100, False), (500, True), (900, False)):
        t = torch.full((3,), time)
        model.batch_sizes.clear()
        expected = plain(x, t) if inside else model(x, t, **cond)
        torch.testing.assert_close(guided(x, t), expected)
        assert model.batch_sizes[-1] == (6 if inside else 3)


def test_guidance_interval_in_sampling_spans_plain_and_no_guidance(conditioning):
    """An interval around every level of the grid is plain guidance; one around none is w = 1."""
    from ldm_lightning.diffusion.processes import DDPMProcess

    cond, uncond = conditioning
    process = DDPMProcess(NoiseSchedule.make("linear"))
    model = CountingModel()

    def draw(interval=None, scale=4.0):
        model_fn = classifier_free_guidance(
            model, scale, cond, uncond, interval=interval,
            sigma_of_time=process.sigma_hat_of_time,
        )
        return sample(model_fn, (3, 2, 5, 5), process=process, steps=8,
                      generator=torch.Generator().manual_seed(0))

    everywhere, nowhere = draw((0.0, 1e9)), draw((1e8, 1e9))
    torch.testing.assert_close(everywhere, draw())
    torch.testing.assert_close(nowhere, draw(scale=1.0))
    assert not torch.allclose(draw((0.0, 1.0)), everywhere)


def test_a_bad_guidance_interval_says_what_is_wrong(conditioning):
    cond, uncond = conditioning
    with pytest.raises(ValueError, match="0 <= lo < hi"):
        classifier_free_guidance(CountingModel(), 3.0, cond, uncond, interval=(2.0, 1.0),
                                 sigma_of_time=lambda t: t)
    with pytest.raises(ValueError, match="needs sigma_of_time"):
        classifier_free_guidance(CountingModel(), 3.0, cond, uncond, interval=(0.0, 1.0))
