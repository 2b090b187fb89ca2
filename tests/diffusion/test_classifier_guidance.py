"""Classifier guidance with the exact classifier of a two-Gaussian mixture.

The data are x0 ~ 0.5 N(-m, s^2) + 0.5 N(+m, s^2) (class 0 on the left, class 1 on the right).
Under any Gaussian process x_t = alpha x0 + sigma eps, each component stays Gaussian,
x_t | y ~ N(alpha mu_y, V) with V = alpha^2 s^2 + sigma^2, so in closed form:

- the exact noisy classifier: p(y | x_t) = softmax_y(-(x_t - alpha mu_y)^2 / (2 V));
- the exact (Bayes-optimal) unconditional denoiser: E[x0 | x_t] = sum_y p(y | x_t) (mu_y +
  alpha s^2 (x_t - alpha mu_y) / V), and eps = (x_t - alpha E[x0 | x_t]) / sigma.

With scale 1, classifier guidance turns the unconditional score into the score of p(x_t | y)
(Dhariwal & Nichol 2021, sec. 4.1 and Algorithm 2), so the samples of label y are those of
N(mu_y, s^2): mean mu_y, std s, and a fraction Phi(m / s) on mu_y's side of 0. Scale 0 samples
the 50/50 mixture; a larger scale, p(x_t) p(y | x_t)^scale, pushes further towards mu_y.

Tolerances: with n samples the fraction has standard error sqrt(p (1 - p) / n), the mean
s / sqrt(n), the std s / sqrt(2 n); each check allows 4 of them plus the sampler's own
discretisation error with the exact conditional denoiser on the same grid (``DISCRETISATION``).
Each draw takes well under a second.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from ldm_lightning.diffusion import NoiseSchedule, classifier_guidance, sample
from ldm_lightning.diffusion.processes import DDPMProcess, EDMProcess, FlowProcess, NoiseProcess

M, S = 1.0, 0.5
MU = torch.tensor([-M, M])
N = 4000  # half asked for class 0, half for class 1
LABELS = (torch.arange(N) >= N // 2).long()
SIDE = 2.0 * LABELS - 1  # the asked-for component's sign
# Each process with a sampler and a number of steps that keep the discretisation error small.
PROCESSES = {
    "ddpm": (lambda: DDPMProcess(NoiseSchedule.make("linear", timesteps=1000)), "ddpm", 250),
    "flow": (lambda: FlowProcess(), "euler", 100),
    "edm": (lambda: EDMProcess(), "heun", 40),
}


def time_to_t(process: NoiseProcess, time: Tensor) -> Tensor:
    """The level t of the time a network is called with (inverse of ``network_input``)."""
    if isinstance(process, FlowProcess):
        return time / process.time_scale
    if isinstance(process, EDMProcess):
        return process.sigma_hat_of_time(time)
    return time


def noisy(
    process: NoiseProcess, inputs: Tensor, time: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_t, alpha, sigma)`` ``[B, 1]`` each and the levels ``t`` ``[B]``, from a network's
    input and time."""
    t = time_to_t(process, time)
    input_scale, _ = process.network_input(torch.ones_like(inputs), t)
    alpha, sigma = (c.to(inputs.dtype).view(-1, 1) for c in process.coefficients(t))
    return inputs / input_scale, alpha, sigma, t


def exact_logits(x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """log p(y | x_t) up to a constant per sample: ``[B, 2]``."""
    variance = alpha**2 * S**2 + sigma**2
    return -((x - alpha * MU) ** 2) / (2 * variance)


def exact_classifier(process: NoiseProcess):
    def classifier(inputs: Tensor, time: Tensor) -> Tensor:
        x, alpha, sigma, _ = noisy(process, inputs, time)
        return exact_logits(x, alpha, sigma)

    return classifier


def exact_denoiser(process: NoiseProcess, conditional: Tensor | None = None):
    """The Bayes-optimal network of the mixture under ``process`` (what it would be trained to
    output); with ``conditional`` labels ``[B]``, that of each sample's own component."""

    def model_fn(inputs: Tensor, time: Tensor) -> Tensor:
        x, alpha, sigma, t = noisy(process, inputs, time)
        variance = alpha**2 * S**2 + sigma**2
        x0_given_y = MU + alpha * S**2 * (x - alpha * MU) / variance  # [B, 2]
        if conditional is None:
            weights = exact_logits(x, alpha, sigma).softmax(dim=-1)
        else:
            weights = torch.nn.functional.one_hot(conditional, 2).to(x.dtype)
        x0 = (weights * x0_given_y).sum(dim=-1, keepdim=True)
        eps = (x - alpha * x0) / sigma
        return process.target(x0, eps, x, t)

    return model_fn


def draw(name: str, scale: float | None, seed: int = 0) -> Tensor:
    """``[N]`` samples of the mixture under ``name``'s process guided at ``scale`` towards
    ``LABELS``; ``scale=None``: each label's own component sampled with its exact denoiser."""
    make, sampler, steps = PROCESSES[name]
    process = make()
    guide = None
    if scale is not None:
        guide = classifier_guidance(exact_classifier(process), LABELS, scale, process)
    model = exact_denoiser(process, LABELS if scale is None else None)
    generator = torch.Generator().manual_seed(seed)
    x = sample(model, (N, 1), sampler=sampler, steps=steps, process=process, guide=guide,
               generator=generator)
    return x[:, 0]


def stats(x: Tensor) -> tuple[float, float, float]:
    """On the asked-for side, per label mirrored onto +: (fraction > 0, mean, std)."""
    mirrored = x * SIDE
    return (mirrored > 0).float().mean().item(), mirrored.mean().item(), mirrored.std().item()


def phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


# The samplers' discretisation error with the exact conditional denoiser on these grids,
# measured with N = 10^5: at most 0.003 in the fraction, 0.004 in the mean, 0.014 in the std
# (ddpm's ancestral sampler, 250 steps, comes out that much narrow).
DISCRETISATION = {"fraction": 0.005, "mean": 0.01, "std": 0.02}


@pytest.mark.parametrize("name", list(PROCESSES))
def test_scale_one_samples_the_component_asked_for(name: str) -> None:
    fraction, mean, std = stats(draw(name, 1.0))
    n = N  # both labels, mirrored onto the same side
    p = phi(M / S)
    assert abs(fraction - p) < 4 * math.sqrt(p * (1 - p) / n) + DISCRETISATION["fraction"]
    assert abs(mean - M) < 4 * S / math.sqrt(n) + DISCRETISATION["mean"]
    assert abs(std - S) < 4 * S / math.sqrt(2 * n) + DISCRETISATION["std"]


@pytest.mark.parametrize("name", list(PROCESSES))
def test_scale_one_is_the_exact_conditional_model(name: str) -> None:
    """grad log p(x_t) + grad log p(y | x_t) = grad log p(x_t | y): on the same noise, the guided
    unconditional denoiser draws what the conditional one draws. Where alpha = 0 (the start of
    flow's grid) the score says nothing about x0, which guidance leaves at E[x0] = 0 while the
    conditional denoiser knows E[x0 | y] = mu_y: a difference of O(1 / steps) there."""
    tolerance = 1e-2 if name == "flow" else 1e-4
    assert (draw(name, 1.0) - draw(name, None)).abs().max() < tolerance


@pytest.mark.parametrize("name", list(PROCESSES))
def test_scale_zero_samples_the_mixture(name: str) -> None:
    x = draw(name, 0.0)
    fraction, mean, _ = stats(x)
    assert abs(fraction - 0.5) < 4 * math.sqrt(0.25 / N)
    assert abs(mean) < 4 * math.hypot(M, S) / math.sqrt(N)
    assert abs(x.std().item() - math.hypot(M, S)) < 4 * math.hypot(M, S) / math.sqrt(2 * N) + 0.02


@pytest.mark.parametrize("name", list(PROCESSES))
def test_a_larger_scale_pushes_further(name: str) -> None:
    """On the same noise, the mean on the asked-for side grows with the scale, and so does the
    fraction there until it reaches 1."""
    fractions, means = zip(*(stats(draw(name, scale))[:2] for scale in (0.0, 0.5, 1.0, 2.0, 4.0)))
    assert all(a < b for a, b in zip(means, means[1:])), means
    assert all(a <= b for a, b in zip(fractions, fractions[1:])), fractions
    assert fractions[0] < fractions[1] < fractions[2] and fractions[-1] > 0.999


# ---------------------------------------------------------------------------- the guide alone
class LinearClassifier(torch.nn.Module):
    """logits = w * input.sum() per sample, one weight per class: d/dx log softmax is known."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([-1.0, 0.5, 2.0]))

    def forward(self, inputs: Tensor, time: Tensor) -> Tensor:
        return inputs.flatten(1).sum(1, keepdim=True) * self.w


def test_the_guide_is_algorithm_2_at_one_level() -> None:
    process = EDMProcess()
    classifier = LinearClassifier()
    labels = torch.tensor([0, 2])
    level = process.level(2.0)
    x, x0 = torch.randn(2, 3), torch.randn(2, 3)
    eps = (x - level.alpha * x0) / level.sigma
    with torch.no_grad():  # as inside the sampler
        x0_g, eps_g = classifier_guidance(classifier, labels, 3.0, process)(x, level, x0, eps)
    # d/dx log softmax(c * s * w)[y] with s = sum(x), c = c_in: c * (w_y - sum_k p_k w_k)
    c_in = process.preconditioning(torch.tensor(2.0))[2].item()
    p = (c_in * x.sum(1, keepdim=True) * classifier.w).softmax(-1)
    w = classifier.w.detach()
    grad = (c_in * (w[labels] - (p * w).sum(-1)))[:, None].expand(2, 3)
    torch.testing.assert_close(eps_g, eps - 3.0 * level.sigma * grad)
    torch.testing.assert_close(x0_g, (x - level.sigma * eps_g) / level.alpha)
    assert classifier.w.grad is None  # the classifier's weights are left alone


def test_at_alpha_zero_x0_is_left_and_scale_zero_changes_nothing() -> None:
    process = FlowProcess()
    level = process.level(1.0)
    assert level.alpha == 0.0
    x, x0 = torch.randn(2, 3), torch.zeros(2, 3)
    guided = classifier_guidance(LinearClassifier(), torch.tensor([1, 2]), 2.0, process)
    x0_g, eps_g = guided(x, level, x0, x)
    assert torch.equal(x0_g, x0) and not torch.equal(eps_g, x)
    unguided = classifier_guidance(LinearClassifier(), torch.tensor([1, 2]), 0.0, process)
    assert all(map(torch.equal, unguided(x, process.level(0.5), x0, x), (x0, x)))


def test_a_classifier_of_another_schedule_or_batch_is_refused() -> None:
    process = DDPMProcess(NoiseSchedule.make("linear", timesteps=1000))
    other = DDPMProcess(NoiseSchedule.make("cosine", timesteps=1000))
    shorter = DDPMProcess(NoiseSchedule.make("linear", timesteps=100))
    level = process.level(500.0)
    x = torch.randn(2, 3)
    for wrong in (other, shorter):
        guide = classifier_guidance(LinearClassifier(), torch.tensor([0, 1]), 1.0, wrong)
        with pytest.raises(ValueError, match="train the classifier on the process and schedule"):
            guide(x, level, x, x)
    guide = classifier_guidance(LinearClassifier(), torch.tensor([0, 1, 2]), 1.0, process)
    with pytest.raises(ValueError, match="3 labels for a batch of 2"):
        guide(x, level, x, x)
