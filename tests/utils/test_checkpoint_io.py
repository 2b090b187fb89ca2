"""AtomicCheckpointIO: every trainer config writes checkpoints through the atomic helper."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch

from ldm_lightning.utils.checkpoint_io import AtomicCheckpointIO
from tests.hydra_utils import compose_config

CPU_DDP = ["trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.sync_batchnorm=false"]


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "multinode"])
def test_every_trainer_config_has_the_atomic_checkpoint_io(trainer: str, tmp_path: Path) -> None:
    cfg = compose_config([f"trainer={trainer}"], tmp_path)
    plugins = hydra.utils.instantiate(cfg.trainer.plugins)
    assert [type(p) for p in plugins].count(AtomicCheckpointIO) == 1


@pytest.mark.parametrize(
    "overrides", [["trainer=cpu"], ["trainer=ddp", "trainer.devices=1", *CPU_DDP]]
)
def test_the_trainer_uses_it(overrides: list[str], tmp_path: Path) -> None:
    cfg = compose_config(overrides, tmp_path)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False)
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"  # the folder is created
    io.save_checkpoint({"global_step": 2, "w": torch.ones(2)}, path)
    with pytest.raises(Exception, match="pickle"):
        io.save_checkpoint({"global_step": 4, "w": torch.zeros(2), "bad": lambda: 0}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_urls_are_written_by_lightning() -> None:
    """Object stores publish whole objects; os.replace has no meaning there."""
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 3}, "memory://run/last.ckpt")
    assert io.load_checkpoint("memory://run/last.ckpt", weights_only=True)["global_step"] == 3
