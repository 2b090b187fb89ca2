"""A sampler of one's own is one Sampler subclass: with a name it is registered, and sample()
runs it given as an instance, by that name or by a ``_target_`` dict; a ``_target_`` naming
anything but a Sampler is refused without importing or calling it."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor

from ldm_lightning.diffusion import (
    SAMPLERS,
    DDIMSampler,
    DPMSolverPP2MSampler,
    NoiseSchedule,
    Sampler,
    make_sampler,
    sample,
)

SAMPLER_CONFIGS = Path(__file__).parents[2] / "conf" / "model" / "sampler"
SHAPE = (4, 2, 3)
SCHEDULE = NoiseSchedule.make("linear", timesteps=100)


def model_fn(x: Tensor, t: Tensor) -> Tensor:
    return torch.tanh(0.8 * x) * (1.0 + t[:, None, None].float() / 100)


def draw(sampler, **kwargs) -> Tensor:
    return sample(model_fn, SHAPE, SCHEDULE, sampler=sampler, steps=6,
                  generator=torch.Generator().manual_seed(0), **kwargs)


@pytest.fixture
def euler_sampler(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[Sampler]]:
    """``EulerX0Sampler`` of this module, for one test: defining it registers it, and other test
    modules parametrise over SAMPLERS when collected, so it is not defined at import."""

    class EulerX0Sampler(Sampler):
        """Euler's method for the probability-flow ODE in xbar = x / alpha, sbar = sigma / alpha,
        d xbar = eps d sbar (DDIM, Song et al. 2021, eq. 14): DDIM with eta = 0, worked out
        another way, from the levels' alpha and sigma."""

        name = "euler_x0"

        def step(self, x, x0, eps, t, s, noise):
            sbar_t, sbar_s = t.sigma / t.alpha, s.sigma / s.alpha
            return s.alpha * (x / t.alpha + (sbar_s - sbar_t) * eps)

    monkeypatch.setitem(globals(), "EulerX0Sampler", EulerX0Sampler)
    yield EulerX0Sampler
    del SAMPLERS[EulerX0Sampler.name]


def test_a_named_subclass_is_registered_and_runs_by_instance_name_and_target(
    euler_sampler: type[Sampler],
) -> None:
    assert SAMPLERS["euler_x0"] is euler_sampler
    by_instance = draw(euler_sampler())
    torch.testing.assert_close(by_instance, draw("ddim"))  # the same ODE step
    assert torch.equal(draw("euler_x0"), by_instance)
    assert torch.equal(draw({"_target_": f"{__name__}.EulerX0Sampler"}), by_instance)
    everything = "ddpm, ddim, dpmpp_2m, euler, heun, euler_ancestral, euler_x0"
    with pytest.raises(ValueError, match=f"choose one of: {everything}"):
        draw("lms")


def test_a_subclass_without_a_name_keeps_its_parents_and_is_not_registered() -> None:
    class Variant(DDIMSampler):
        pass

    assert Variant.name == "ddim" and SAMPLERS["ddim"] is DDIMSampler
    assert list(SAMPLERS) == ["ddpm", "ddim", "dpmpp_2m", "euler", "heun", "euler_ancestral"]


def test_an_instance_keeps_its_options_and_is_reset_between_runs() -> None:
    assert torch.equal(draw(DDIMSampler(eta=1.0), eta=0.0), draw("ddim", eta=1.0))
    solver = DPMSolverPP2MSampler()  # remembers the previous x0 and h within a run
    first = draw(solver)
    assert torch.equal(draw(solver), first) and torch.equal(draw("dpmpp_2m"), first)


def test_a_dicts_options_come_before_the_arguments_it_leaves_out() -> None:
    ddim = "ldm_lightning.diffusion.samplers.DDIMSampler"
    assert make_sampler({"_target_": ddim, "eta": 1.0}, eta=0.5, variance="fixed_large").eta == 1
    assert make_sampler({"_target_": ddim}, eta=0.5, variance="fixed_large").eta == 0.5
    with pytest.raises(ValueError, match="DDIMSampler has no option etaa; its options: eta"):
        make_sampler({"_target_": ddim, "etaa": 1.0})
    with pytest.raises(ValueError, match="eta must be >= 0"):
        make_sampler({"_target_": ddim, "eta": -1.0})


@pytest.mark.parametrize("option", sorted(p.stem for p in SAMPLER_CONFIGS.glob("*.yaml")))
def test_each_sampler_config_builds_the_sampler_of_its_name(option: str) -> None:
    config = OmegaConf.to_container(OmegaConf.load(SAMPLER_CONFIGS / f"{option}.yaml"))
    assert type(make_sampler(config)) is SAMPLERS[option]


@pytest.mark.parametrize("target", ["os.system", "torch.nn.Linear", "this.Zen",
                                    "ldm_lightning.diffusion.samplers.Missing"])
def test_a_target_must_name_a_sampler_class_and_imports_nothing_else(target: str) -> None:
    assert "this" not in sys.modules  # importing it prints the Zen of Python
    with pytest.raises(ValueError, match="is not a sampler class.*choose one of: ddpm, ddim"):
        draw({"_target_": target})
    assert "this" not in sys.modules
