"""The shapes sample scorer (experiments/bench/score_samples.py): rendered shapes in class
folders score as clean and right, in all and per class; a wrong folder scores as wrong."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ldm_lightning.data.shapes import ShapesDataset, render
from ldm_lightning.utils.images import save_png, to_unit

SCRIPT = Path(__file__).parents[1] / "experiments" / "bench" / "score_samples.py"


def test_rendered_classes_score_right_and_clean_and_a_wrong_folder_does_not(tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("score_samples", SCRIPT)
    scorer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scorer)
    dataset = ShapesDataset(4, 32, split="test")
    for i in range(4):
        drawn = replace(dataset.spec(i), shape="circle", colour="orange", radius=0.3)
        save_png(to_unit(render(drawn, 32)), tmp_path / "samples" / "orange circle" / f"{i}.png")
        # An untaught concept: the sampler drew red squares for it.
        wrong = replace(drawn, shape="square", colour="red")
        save_png(to_unit(render(wrong, 32)), tmp_path / "samples" / "cyan circle" / f"{i}.png")
    scores = scorer.score_folder(tmp_path)
    assert scores["samples"] == 8 and scores["clean"] == 1.0
    assert scores["per_class"] == {"cyan circle": 0.0, "orange circle": 1.0}
    assert scores["per_class_clean"] == {"cyan circle": 1.0, "orange circle": 1.0}
    assert scores["shape_and_colour"] == 0.5
    noise = np.random.default_rng(0).uniform(-1, 1, (3, 32, 32)).astype(np.float32)
    save_png(to_unit(torch.from_numpy(noise)), tmp_path / "samples" / "orange circle" / "9.png")
    assert scorer.score_folder(tmp_path)["per_class_clean"]["orange circle"] == 0.8
