"""Learning-rate schedules: warm-up, cosine and linear decay against their closed forms."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ldm_lightning.models.diffusion import OPTIMIZER
from ldm_lightning.models.optim import build_optimizer, lr_factor, schedule_lambda, wants_fused


def test_warmup_rises_linearly_then_constant_holds() -> None:
    factors = [lr_factor(step, 4, 100, "constant") for step in range(8)]
    assert factors == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("step", [10, 35, 60, 85, 110])
def test_cosine_after_warmup_matches_sgdr(step: int) -> None:
    warmup, total, floor = 10, 110, 0.1
    progress = (step - warmup) / (total - warmup)
    expected = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    assert lr_factor(step, warmup, total, "cosine", floor) == pytest.approx(expected)


def test_decays_end_at_the_floor_and_stay_there() -> None:
    for schedule in ("cosine", "linear"):
        assert lr_factor(100, 0, 100, schedule, 0.2) == pytest.approx(0.2)
        assert lr_factor(500, 0, 100, schedule, 0.2) == pytest.approx(0.2)
    assert lr_factor(25, 0, 100, "linear") == pytest.approx(0.75)
    assert lr_factor(50, 0, 100, "cosine") == pytest.approx(0.5)


def test_unknown_schedule_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="constant.*cosine.*linear"):
        lr_factor(0, 0, 10, "exponential")


def test_a_decay_over_an_unbounded_run_says_what_to_set() -> None:
    module = SimpleNamespace(_trainer=True, trainer=SimpleNamespace(
        estimated_stepping_batches=float("inf")))
    with pytest.raises(ValueError, match="schedule=cosine needs a known run length.*max_epochs"
                                         ".*max_time.*schedule=constant"):
        schedule_lambda(module, {"schedule": "cosine"})
    assert schedule_lambda(module, {"schedule": "constant", "warmup_steps": 2})(0) == 0.5


def test_fused_kernel_only_on_cuda_without_clipping_or_a_choice_in_the_config() -> None:
    assert wants_fused(torch.optim.AdamW, {"cuda"}, clipping=False, arguments={})
    assert not wants_fused(torch.optim.AdamW, {"cpu"}, clipping=False, arguments={})
    assert not wants_fused(torch.optim.AdamW, {"cuda", "cpu"}, clipping=False, arguments={})
    assert not wants_fused(torch.optim.AdamW, {"cuda"}, clipping=True, arguments={})
    assert not wants_fused(torch.optim.AdamW, {"cuda"}, clipping=False, arguments={"fused": False})
    assert not wants_fused(torch.optim.AdamW, {"cuda"}, clipping=False, arguments={"foreach": True})
    assert not wants_fused(torch.optim.LBFGS, {"cuda"}, clipping=False, arguments={})


def test_cpu_parameters_keep_torchs_default_kernel() -> None:
    module = SimpleNamespace(_trainer=None, hparams={})
    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer, _ = build_optimizer(module, params, {"base_lr": 1e-3}, OPTIMIZER)
    assert not optimizer.defaults["fused"]
