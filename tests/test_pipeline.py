"""`python -m ldm_lightning.pipeline`: every stage in its own folder, finished stages reused,
an interrupted one resumed, a folder of another config refused."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from ldm_lightning.models import LatentDiffusionModule
from ldm_lightning.models.checkpoints import load_stage
from ldm_lightning.pipeline import run_pipeline, shared_overrides
from tests.hydra_utils import TINY_AUTOENCODER
from tests.models.test_diffusion_module import TINY_LDM
from tests.test_evaluate import EXTRACTOR

FIRST_STAGE = [o for o in TINY_AUTOENCODER if o.startswith("model.")]
SHARED = [o for o in TINY_LDM if not o.startswith("model.")]


def pipeline(tmp_path: Path, *extra: str, experiment: str = "shapes_ldm_class") -> dict:
    overrides = [
        f"+experiment={experiment}", *SHARED, *[o for o in TINY_LDM if o.startswith("model.")],
        f"paths.log_dir={tmp_path / 'logs'}", f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.data_dir={tmp_path / 'data'}", "test=false",
        "pipeline.first_stage=shapes_vq", f"pipeline.first_stage_overrides={FIRST_STAGE}",
        "pipeline.sample.per_class=1", "+pipeline.sample.steps=2",
        f"+pipeline.evaluate.feature_extractor={EXTRACTOR}",
        "pipeline.evaluate.protocol.num_samples=8",
        "+pipeline.evaluate.batch_size=4", "+pipeline.evaluate.progress=false", *extra,
    ]
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose("pipeline", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        return run_pipeline(cfg, overrides)


def test_the_stages_run_once_and_resume(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    written = pipeline(tmp_path)
    root = tmp_path / "logs" / "pipelines" / "shapes_ldm_class"
    first = root / "first_stage" / "checkpoints" / "last.ckpt"
    ldm = root / "ldm" / "checkpoints" / "last.ckpt"
    assert written["checkpoint"] == str(ldm) and first.is_file()
    classes = sorted(p.name for p in (root / "samples" / "samples").iterdir())
    assert len(classes) == 18 and "red circle" in classes  # one folder per class, by name
    assert (root / "evaluate" / "metrics.json").is_file()
    assert written["metrics"]["metrics"]["fid"] >= 0

    stamps = {path: path.stat().st_mtime_ns for path in (first, ldm)}
    caplog.set_level(logging.INFO, logger="ldm_lightning.pipeline")
    pipeline(tmp_path)  # nothing left to do
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps
    assert caplog.text.count("finished before, reusing") == 2

    (root / "ldm" / "stage.json").unlink()  # as if killed after its last checkpoint
    caplog.clear()
    pipeline(tmp_path)
    assert f"Stage ldm: resuming from {ldm}" in caplog.text
    assert "Stage first_stage: finished before" in caplog.text

    with pytest.raises(ValueError, match=r"holds a run of another config.*pipeline.dir"):
        pipeline(tmp_path, "data.seed=1")


def test_a_text_model_gets_its_conditioner_stage_and_prompts_from_the_data(
    tmp_path: Path,
) -> None:
    tiny_clip = ["model.width=16", "model.encoder.vocab_size=400", "model.encoder.layers=1",
                 "model.encoder.heads=2", "model.image_encoder.channels=[8,16]",
                 "model.embed_dim=8"]
    written = pipeline(tmp_path, f"pipeline.conditioner_overrides={tiny_clip}",
                       "pipeline.evaluate=null", experiment="shapes_ldm_text")
    root = tmp_path / "logs" / "pipelines" / "shapes_ldm_text"
    clip = root / "conditioner" / "checkpoints" / "last.ckpt"
    ldm = load_stage(LatentDiffusionModule, written["checkpoint"], "latent_diffusion")
    assert ldm.hparams.conditioning["text_ckpt_path"] == str(clip)
    assert ldm.hparams.first_stage["ckpt_path"] == str(root / "first_stage" / "checkpoints"
                                                         / "last.ckpt")
    prompts = OmegaConf.load(root / "samples" / "config.yaml").prompts
    assert prompts and all(p.startswith("a ") and "background" in p for p in prompts)
    assert "metrics" not in written


def test_only_the_shared_overrides_reach_the_earlier_stages() -> None:
    given = ["+experiment=folder_ldm_class", "data.root=/x", "trainer=gpu", "model.unet.x=1",
             "pipeline.first_stage=folder_kl", "+model/sampler=ddpm", "seed=3"]
    assert shared_overrides(given) == ["data.root=/x", "trainer=gpu", "seed=3"]
