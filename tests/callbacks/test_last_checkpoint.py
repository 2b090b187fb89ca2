"""LastCheckpoint: last.ckpt at every epoch end and every N steps; mid-epoch resume."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from ldm_lightning.callbacks.last_checkpoint import LastCheckpoint
from tests.test_kill_resume import Crash, CrashAtStep


class Tiny(pl.LightningModule):
    """One linear layer; records the global step of every checkpoint and every batch trained."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.saved_at: list[int] = []
        self.trained: list[tuple[int, int]] = []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.trained.append((self.current_epoch, batch_idx))
        return self.layer(batch[0]).square().mean()

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", self.layer(batch[0]).square().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.saved_at.append(self.trainer.global_step)


def fit(dirpath: Path, every_n_train_steps: int | None, ckpt_path: Path | None = None,
        crash_at: int | None = None) -> Tiny:
    """3 epochs of 4 batches, validated every epoch."""
    model = Tiny()
    callbacks = [LastCheckpoint(dirpath, every_n_train_steps)]
    if crash_at is not None:
        callbacks.append(CrashAtStep(crash_at))
    trainer = pl.Trainer(max_epochs=3, callbacks=callbacks, logger=False, accelerator="cpu",
                         enable_progress_bar=False, enable_model_summary=False)
    data = DataLoader(TensorDataset(torch.randn(16, 2)), batch_size=4, shuffle=True)
    val = DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=4)
    with contextlib.suppress(Crash):
        trainer.fit(model, data, val, ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize(("n", "saved_at"), [(None, [4, 8, 12]), (3, [3, 4, 7, 8, 11, 12])])
def test_saves_at_epoch_ends_and_every_n_steps(n: int | None, saved_at: list[int],
                                               tmp_path: Path) -> None:
    """N counts from the last save of either kind; an epoch's last batch is the epoch end's."""
    assert fit(tmp_path, n).saved_at == saved_at
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_mid_epoch_checkpoint_resumes_to_the_same_step_and_epoch(tmp_path: Path) -> None:
    crashed = fit(tmp_path, 3, crash_at=7)  # saves at 3, 4 (epoch end), 7, then dies
    assert crashed.saved_at == [3, 4, 7]
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    progress = last["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
    assert (last["global_step"], last["epoch"], progress["ready"]) == (7, 1, 3)

    resumed = fit(tmp_path, 3, ckpt_path=tmp_path / "last.ckpt")
    # Lightning 2.6 restores the batch count within the epoch and restarts the (non-stateful)
    # loader: the interrupted epoch gets only its one missing batch, then epoch 2 runs whole.
    assert resumed.trained == [(1, 3), (2, 0), (2, 1), (2, 2), (2, 3)]
    final = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert (final["global_step"], final["epoch"]) == (12, 2)


def test_every_n_train_steps_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="positive number of steps, or null"):
        LastCheckpoint(tmp_path, every_n_train_steps=0)
