"""TimedCheckpoints: checkpoints every N seconds of training (validation excluded), stamped."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from ldm_lightning.callbacks.last_checkpoint import LastCheckpoint
from ldm_lightning.callbacks.timed_checkpoints import TIME_KEY, TimedCheckpoints


class Clock:
    """A fake monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Ticking(pl.LightningModule):
    """A training step takes 1 s of the fake clock, a validation batch 50 s."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.clock = clock

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.clock.now += 1.0
        return self.layer(batch[0]).square().mean()

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.clock.now += 50.0
        self.log("val/loss", self.layer(batch[0]).square().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tmp_path: Path, every_seconds: float, max_epochs: int = 2,
        ckpt_path: Path | None = None) -> TimedCheckpoints:
    """``max_epochs`` epochs of 4 batches (4 s of training each), each validated (1 batch)."""
    clock = Clock()
    timed = TimedCheckpoints(tmp_path / "timed", every_seconds, clock=clock)
    trainer = pl.Trainer(
        max_epochs=max_epochs, logger=False, accelerator="cpu", enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=1,
        callbacks=[timed, LastCheckpoint(tmp_path)],
    )
    data = DataLoader(TensorDataset(torch.randn(16, 2)), batch_size=4)
    val = DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=4)
    trainer.fit(Ticking(clock), data, val, ckpt_path=ckpt_path)
    return timed


def stamp(path: Path) -> dict:
    return torch.load(path, weights_only=True)[TIME_KEY]


def test_saves_every_n_training_seconds_and_at_the_end_with_the_seconds(tmp_path: Path) -> None:
    timed = fit(tmp_path, every_seconds=3)
    # 8 steps of 1 s: past 3 s after step 3, past 6 s after step 6, and the end (step 8).
    assert [p.name for p in timed.saved] == [
        "t000003s-step0000003.ckpt", "t000006s-step0000006.ckpt", "t000008s-step0000008.ckpt",
    ]
    assert sorted(p.name for p in (tmp_path / "timed").iterdir()) == [p.name for p in timed.saved]
    stamps = [stamp(path) for path in timed.saved]
    assert [s["train_seconds"] for s in stamps] == [3.0, 6.0, 8.0]
    assert [s["global_step"] for s in stamps] == [3, 6, 8]
    # The wall clock counts the first epoch's validation (50 s) too; the sanity check ran
    # before training started and counts in neither.
    assert [s["wall_seconds"] for s in stamps] == [3.0, 56.0, 108.0]
    # Every checkpoint written in training is stamped: last.ckpt after epoch 1 (8 s of training).
    assert stamp(tmp_path / "last.ckpt")["train_seconds"] == 8.0


def test_a_resumed_run_continues_both_clocks(tmp_path: Path) -> None:
    fit(tmp_path, every_seconds=5, max_epochs=1)  # saves t=4 at its end, next save due at 5
    timed = fit(tmp_path, every_seconds=5, max_epochs=2, ckpt_path=tmp_path / "last.ckpt")
    assert [p.name for p in timed.saved] == ["t000005s-step0000005.ckpt",
                                             "t000008s-step0000008.ckpt"]
    assert stamp(timed.saved[-1])["train_seconds"] == 8.0


def test_every_seconds_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="positive number of seconds"):
        TimedCheckpoints(tmp_path, 0)
