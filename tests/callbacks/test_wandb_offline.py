"""logger=wandb with no account: offline, no prompt, a run with images on disk."""

from __future__ import annotations

import pytest

from ldm_lightning.train import train
from ldm_lightning.utils.wandb import has_api_key, run_group_and_name, use_offline
from tests.hydra_utils import TINY_AUTOENCODER, compose_config


@pytest.fixture
def no_account(monkeypatch, tmp_path):
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    return tmp_path / "netrc"


def test_offline_without_a_key_online_with_one(no_account, monkeypatch) -> None:
    assert not has_api_key() and use_offline()
    no_account.write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    assert has_api_key() and not use_offline()
    no_account.write_text("machine example.com\n  login user\n  password secret\n")
    assert not has_api_key()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert not use_offline()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert use_offline()
    assert not use_offline(offline=False)


def test_group_and_name_are_the_task_outside_a_sweep() -> None:
    assert run_group_and_name("shapes_ldm") == ("shapes_ldm", "shapes_ldm")


def test_offline_wandb_run_holds_the_logged_images(no_account, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    overrides = [o for o in TINY_AUTOENCODER if o != "logger=csv"]
    cfg = compose_config(["+experiment=shapes_vq", *overrides, "logger=wandb", "test=false",
                          "tags=[shapes,smoke]"], tmp_path / "run")
    assert cfg.logger.wandb.group is None  # decided at run time: the task name
    train(cfg)
    (run,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    images = list(run.glob("files/media/images/**/*.png"))
    assert any("reconstructions" in p.name for p in images)
    assert list(run.glob("*.wandb"))
    assert list((tmp_path / "run" / "images").glob("reconstructions_*.png"))  # PNG in run dir


def test_runs_are_grouped_and_tagged_by_experiment(no_account, tmp_path) -> None:
    import wandb

    from ldm_lightning.utils.wandb import wandb_logger

    logger = wandb_logger(save_dir=str(tmp_path), task_name="shapes_ldm", tags=["shapes", "ldm"])
    try:
        assert logger.experiment.group == "shapes_ldm"
        assert set(logger.experiment.tags) == {"shapes", "ldm"}
        assert logger.experiment.settings.mode in ("offline", "dryrun")
    finally:
        wandb.finish()
