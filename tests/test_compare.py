"""The equal-budget comparison: +experiment=shapes_compare with its `compare` variants, and the
report, `python -m ldm_lightning.compare`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationToMissingValueError
from PIL import Image

from ldm_lightning.compare import compare
from ldm_lightning.metrics.comparison import find_runs, score_checkpoint, variant_names
from ldm_lightning.metrics.fid import (
    GenerativeMetrics,
    extract,
    frechet_distance,
    gaussian_statistics,
)
from ldm_lightning.metrics.shapes_checker import score_labels
from ldm_lightning.models import LatentDiffusionModule
from ldm_lightning.models.checkpoints import load_stage
from ldm_lightning.train import train
from tests.hydra_utils import compose_config
from tests.models.test_diffusion_module import autoencoder_ckpt  # noqa: F401 (a fixture)
from tests.test_evaluate import EXTRACTOR, TINY_DATA, TinyFeatures

UNET = "ldm_lightning.nn.unet.UNetModel"
DIT = "ldm_lightning.nn.dit.DiT"
EXPERIMENT = "+experiment=shapes_compare"
AUTOENCODERS = ["compare.autoencoder_f4=/runs/f4.ckpt", "compare.autoencoder_f8=/runs/f8.ckpt"]
TINY = [
    *TINY_DATA, "model.unet.model_channels=16", "model.unet.channel_mult=[1,2]",
    "model.unet.attention_resolutions=[2]", "model.unet.num_head_channels=8",
    "model.scale_factor_batches=2", "trainer.max_steps=2", "logger=csv",
    # A checkpoint after every step: after step 1, and after step 2, which is the end.
    "callbacks.timed_checkpoints.every_seconds=1e-6",
]


@pytest.mark.parametrize(("variant", "first_stage", "backbone", "attention"), [
    ("pixel", {"identity": True, "ckpt_path": None}, UNET, [4]),
    ("latent_f4", {"identity": False, "ckpt_path": "/runs/f4.ckpt"}, UNET, [2, 4]),
    ("latent_f4_dit", {"identity": False, "ckpt_path": "/runs/f4.ckpt"}, DIT, None),
    ("latent_f8", {"identity": False, "ckpt_path": "/runs/f8.ckpt"}, UNET, [1, 2]),
])
def test_each_variant_is_the_class_ldm_with_its_first_stage_and_backbone(
    variant: str, first_stage: dict, backbone: str, attention: list | None, tmp_path: Path
) -> None:
    cfg = compose_config([EXPERIMENT, f"compare={variant}", *AUTOENCODERS], tmp_path)
    base = compose_config(["+experiment=shapes_ldm_class"], tmp_path)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    assert {k: model["first_stage"][k] for k in first_stage} == first_stage
    assert model["unet"]["_target_"] == backbone
    assert model["unet"].get("attention_resolutions") == attention
    assert model["conditioning"] == OmegaConf.to_container(base.model.conditioning)
    assert model["process"]["_target_"].endswith("FlowProcess")  # the demo's objective
    assert model["optimizer"]["schedule"] == "constant"  # a time budget has no step count
    assert cfg.data == base.data and cfg.seed == base.seed  # the same data for every variant
    assert (cfg.trainer.max_time, cfg.trainer.max_epochs) == ("00:00:10:00", -1)
    assert cfg.callbacks.timed_checkpoints.every_seconds == 120
    assert cfg.callbacks.ema.decay == base.callbacks.ema.decay
    assert cfg.callbacks.image_logger is None
    assert cfg.task_name == "shapes_compare"


def test_a_latent_variant_needs_its_autoencoder(tmp_path: Path) -> None:
    cfg = compose_config([EXPERIMENT, "compare=latent_f8", AUTOENCODERS[0]], tmp_path)
    with pytest.raises(InterpolationToMissingValueError, match="compare.autoencoder_f8"):
        OmegaConf.to_container(cfg.model, resolve=True)
    # The default, pixel space, reads neither, so one multirun can hold all the variants.
    pixel = compose_config([EXPERIMENT], tmp_path)
    assert pixel.model.first_stage.identity


def test_the_multiruns_base_config_takes_every_override_but_the_swept_variant(
    tmp_path: Path,
) -> None:
    """``train -m ... compare=pixel,latent_f4 trainer.max_time=...`` composes the config once
    without the swept group (Hydra skips it): the keys the command sets must exist then."""
    cfg = compose_config([EXPERIMENT, *AUTOENCODERS, "trainer.max_time=00:00:08:00",
                          "callbacks.timed_checkpoints.every_seconds=60"], tmp_path)
    assert cfg.compare == {"autoencoder_f4": "/runs/f4.ckpt", "autoencoder_f8": "/runs/f8.ckpt"}
    assert cfg.trainer.max_time == "00:00:08:00"


def test_the_f8_autoencoder_gives_4x4_latents(tmp_path: Path) -> None:
    cfg = compose_config(["+experiment=shapes_kl_f8"], tmp_path)
    autoencoder = hydra.utils.instantiate(cfg.model)
    z = autoencoder.encode(torch.zeros(1, 3, 32, 32))
    assert tuple(z.shape) == (1, 4, 4, 4)


@pytest.fixture(scope="module")
def sweep(autoencoder_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """Two tiny variants trained as a multirun lays them out: ``<sweep>/0``, ``<sweep>/1``,
    each with the ``.hydra/overrides.yaml`` Hydra writes."""
    root = tmp_path_factory.mktemp("sweep")
    for job, variant in enumerate(["pixel", "latent_f4"]):
        overrides = [EXPERIMENT, f"compare={variant}", f"compare.autoencoder_f4={autoencoder_ckpt}",
                     *TINY]
        train(compose_config(overrides, root / str(job)))
        (root / str(job) / ".hydra").mkdir()
        OmegaConf.save(OmegaConf.create(overrides), root / str(job) / ".hydra" / "overrides.yaml")
    return root


def report_config(tmp_path: Path, *overrides: str):
    return compose_config(
        [f"feature_extractor={EXTRACTOR}", "per_class=1", "batch_size=9", "steps=2",
         "progress=false", *overrides],
        tmp_path, config_name="compare_report",
    )


def test_the_report_has_a_row_per_checkpoint_a_command_per_variant_and_plots(
    sweep: Path, tmp_path: Path
) -> None:
    report = compare(report_config(tmp_path, f"runs=[{sweep}]"), "python -m ldm_lightning.compare")
    assert json.loads((tmp_path / "compare.json").read_text()) == report
    assert [run["variant"] for run in report["runs"]] == ["compare=pixel", "compare=latent_f4"]
    for run in report["runs"]:
        rows = run["checkpoints"]
        assert [row["global_step"] for row in rows] == [1, 2]
        assert rows[0]["train_seconds"] < rows[1]["train_seconds"] <= rows[1]["wall_seconds"]
        for row in rows:
            assert row["samples"] == 18 and math.isfinite(row["fid"])
            assert 0 <= row["accuracy"] <= 1 and 0 <= row["shape_iou"] <= 1
        assert run["command"].startswith(f"python -m ldm_lightning.train {EXPERIMENT} compare=")
    assert report["feature_extractor"].startswith("tests.test_evaluate.TinyFeatures:")
    assert report["num_real"] == 16 and report["settings"]["sampler"] == "euler_ancestral"

    text = (tmp_path / "compare.md").read_text()
    finals, along = text.split("## Along training")
    assert finals.count("| compare=pixel |") == finals.count("| compare=latent_f4 |") == 1
    assert along.count("| compare=pixel |") == along.count("| compare=latent_f4 |") == 2
    command = f"ldm_lightning.train {EXPERIMENT} compare=latent_f4 compare.autoencoder_f4="
    assert f"python -m {command}" in text
    assert report["feature_extractor"] in text and "linear in 1/N" in text
    for name in ("fid", "accuracy", "clean", "shape_iou"):
        with Image.open(tmp_path / f"{name}.png") as image:
            assert image.format == "PNG"
        assert f"![{name}]({name}.png)" in text
    grids = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "grids").rglob("*"))
    assert len([g for g in grids if g.endswith(".png")]) == 4


def test_a_checkpoints_scores_are_the_fid_and_checker_of_its_samples(sweep: Path) -> None:
    run = find_runs([sweep])[1]
    module = load_stage(LatentDiffusionModule, run.checkpoints[-1], "latent_diffusion")
    real = torch.stack([item["image"] for item in hydra.utils.instantiate(
        run.data_config()).build_split("train")])
    extractor = TinyFeatures()
    metrics = GenerativeMetrics(extractor, extract(extractor, real)[0])
    scores, images, labels = score_checkpoint(module, metrics, per_class=1, num_samples=4,
                                              batch_size=9, shapes=True, steps=2)
    assert labels == list(range(18)) and images.shape == (18, 3, 16, 16)
    expected = frechet_distance(*gaussian_statistics(extract(extractor, real)[0].numpy()),
                                *gaussian_statistics(extract(extractor, images)[0].numpy()))
    assert scores["fid"] == pytest.approx(expected, rel=1e-3)
    assert {k: scores[k] for k in ("accuracy", "shape_iou", "clean")} == score_labels(images,
                                                                                      labels)


def test_runs_are_named_by_the_overrides_that_differ(sweep: Path) -> None:
    runs = find_runs([sweep / "1", sweep / "0"])
    assert [run.path.name for run in runs] == ["1", "0"]
    assert variant_names(runs) == ["compare=latent_f4", "compare=pixel"]
    assert variant_names(runs[:1]) == ["1"]  # nothing differs: the directory's name


def test_a_run_without_time_stamped_checkpoints_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no time-stamped checkpoints.*shapes_compare"):
        find_runs([tmp_path / "run"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a run directory"):
        find_runs([tmp_path / "empty"])
