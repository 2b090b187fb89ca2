"""Compose the real configs as the entry points do, pointed at a temporary run directory."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

# Tiny, offline versions of every stage: a few batches of 16 px shapes.
TINY_AUTOENCODER = [
    "data.image_size=16",
    "data.batch_size=4",
    "data.num_train=16",
    "data.num_val=8",
    "data.num_test=8",
    "model.ch=8",
    "model.ch_mult=[1,2]",
    "model.num_res_blocks=1",
    "model.n_embed=16",
    "model.loss.disc_ndf=8",
    "trainer.max_epochs=1",
    "logger=csv",
]


def compose_config(overrides: list[str], tmp_path: Path, config_name: str = "train") -> DictConfig:
    """The config ``python -m ldm_lightning.<config_name> <overrides>`` would run with."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.cache_dir = str(tmp_path / "cache")
        cfg.paths.data_dir = str(tmp_path / "data")
        del cfg["hydra"]  # as in a real run: Hydra's own config lives in HydraConfig only
    return cfg
