"""The conditioning benchmark's checker: it must read real renders back before it scores samples."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from ldm_lightning.models.first_stage import IdentityFirstStage

SCRIPT = Path(__file__).parents[1] / "experiments" / "bench" / "conditioning_accuracy.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("conditioning_accuracy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checker_reads_real_renders(bench) -> None:
    scores = bench.calibrate(image_size=32, count=300)
    assert scores["shape"] >= 0.99 and scores["colour"] == 1.0 and scores["background"] == 1.0


def test_prompt_renders_are_what_the_prompts_say(bench) -> None:
    wanted, condition = bench.targets("text")
    assert len(wanted) == 18 and len(condition["prompts"]) == 18
    assert condition["prompts"][2] == "a blue circle on a gray background"
    images = bench.prompt_renders(wanted, per=3, size=32, seed=0)
    assert images.shape == (54, 3, 32, 32)
    scores = bench.score(images, wanted, per=3)
    assert scores.pop("shape_iou") > 0.9
    assert scores == {"shape": 1.0, "colour": 1.0, "both": 1.0, "background": 1.0}


def test_ceiling_of_a_lossless_first_stage_is_the_checkers_accuracy(bench) -> None:
    wanted, _ = bench.targets("text")
    assert bench.first_stage_ceiling(IdentityFirstStage(), wanted, 2, 32, 0)["both"] == 1.0


def test_a_colour_shifting_first_stage_loses_colour_not_shape(bench) -> None:
    """A decoder that swaps red and blue channels turns blue shapes red; the score shows it."""

    class SwapRedBlue(IdentityFirstStage):
        def decode(self, z: torch.Tensor) -> torch.Tensor:
            return z.flip(1)

    wanted, _ = bench.targets("text")
    scores = bench.first_stage_ceiling(SwapRedBlue(), wanted, 2, 32, 0)
    assert scores["shape"] == 1.0 and scores["colour"] < 0.9


def test_shape_iou_drops_for_a_distorted_shape(bench) -> None:
    """A square with a bite taken out still reads as a square, but its fit IoU shows the damage."""
    wanted = [{"shape": "square", "colour": "red", "background": "white"}]
    image = bench.prompt_renders(wanted, per=1, size=32, seed=1)[0]
    clean = bench.read_image(image)
    bitten = image.clone()
    rows, cols = torch.nonzero(image[1] < 0, as_tuple=True)  # red pixels: low green
    top, left = rows.min().item(), cols.min().item()
    side = (rows.max().item() - top) // 3
    bitten[:, top:top + side, left:left + side] = image[:, 0:1, 0:1]  # background colour
    assert clean["shape"] == "square" and clean["iou"] > 0.9
    assert bench.read_image(bitten)["iou"] < clean["iou"] - 0.05
