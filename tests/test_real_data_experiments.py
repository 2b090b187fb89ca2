"""The real-data experiments run end to end on fake on-disk copies of the release layouts."""

from __future__ import annotations

from pathlib import Path

import pytest

from ldm_lightning.train import train
from tests.data.fake_layouts import make_fake_celebahq, make_fake_pets
from tests.hydra_utils import TINY_AUTOENCODER, compose_config

# The published configs ask for a GPU, wandb, 8 workers and pretrained LPIPS; the test keeps
# everything else.
ON_THIS_MACHINE = [
    "trainer=cpu", "logger=csv", "data.num_workers=0", "data.batch_size=2",
    "model.perceptual.pretrained_backbone=false",  # LPIPS stays on, without the download
    "data.image_size=32",  # the published 3-layer PatchGAN needs >= 24 px
]
TINY = [o for o in TINY_AUTOENCODER if not o.startswith(("data.num_", "data.batch_size"))]


@pytest.mark.parametrize("experiment", ["pets_vq", "pets_kl"])
def test_pets_experiments_run_on_the_fake_release(experiment: str, tmp_path: Path) -> None:
    make_fake_pets(tmp_path / "data")
    cfg = compose_config(
        [f"+experiment={experiment}", "debug=fdr", *TINY, *ON_THIS_MACHINE, "data.download=false"],
        tmp_path,
    )
    cfg.paths.data_dir = str(tmp_path / "data")
    metrics = train(cfg)
    assert metrics["val/rec_loss"] > 0


@pytest.mark.parametrize("experiment", ["celebahq_vq", "celebahq_kl"])
def test_celebahq_experiments_run_on_the_fake_release(experiment: str, tmp_path: Path) -> None:
    make_fake_celebahq(tmp_path / "data" / "celebahq", n=8)
    cfg = compose_config(
        [f"+experiment={experiment}", "debug=fdr", *TINY, *ON_THIS_MACHINE, "data.num_train=6"],
        tmp_path,
    )
    cfg.paths.data_dir = str(tmp_path / "data")
    metrics = train(cfg)
    assert metrics["val/rec_loss"] > 0


def test_missing_dataset_fails_with_the_download_instructions(tmp_path: Path) -> None:
    cfg = compose_config(
        ["+experiment=celebahq_vq", "debug=fdr", *TINY, *ON_THIS_MACHINE], tmp_path
    )
    cfg.paths.data_dir = str(tmp_path / "empty")
    with pytest.raises(Exception, match="CelebA"):
        train(cfg)
