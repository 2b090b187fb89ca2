"""Progress lines where stdout is not a terminal (the rich bar draws only on one)."""

from __future__ import annotations

import io
import logging
import re

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import RichProgressBar
from pytorch_lightning.callbacks.progress import ProgressBar
from torch.utils.data import DataLoader

from ldm_lightning.callbacks.progress import LineProgress, format_line, progress_bar
from ldm_lightning.callbacks.throughput import ThroughputMonitor
from ldm_lightning.utils.instantiate import instantiate_callbacks
from tests.callbacks.test_throughput import Linear
from tests.hydra_utils import compose_config


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    """Fake time: one second per training step, none elsewhere."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class LoggingLinear(Linear):
    """Logs its loss on the progress bar and a validation loss, and advances ``clock``."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock

    def training_step(self, batch, batch_idx):
        self.clock.now += 1.0
        loss = super().training_step(batch, batch_idx)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", super().training_step(batch, batch_idx))


def test_format_line_joins_the_known_parts() -> None:
    line = format_line(
        "epoch 0/9 batch 3/4 step 3/20 15%", {"train/loss": 0.123456, "train/rec_loss": 2.0},
        images_per_sec=45.06, elapsed=62.4, eta=3725,
    )
    assert line == (
        "epoch 0/9 batch 3/4 step 3/20 15% | train/loss=0.1235 train/rec_loss=2 | 45.1 images/s"
        " | elapsed 0:01:02 | ETA 1:02:05"
    )
    assert format_line("Validation done", {}, elapsed=1.0) == "Validation done | elapsed 0:00:01"


def test_the_rich_bar_on_a_terminal_lines_elsewhere_nothing_when_disabled() -> None:
    assert isinstance(progress_bar(stream=Terminal()), RichProgressBar)
    lines = progress_bar(every_n_steps=7, stream=io.StringIO())
    assert isinstance(lines, LineProgress) and lines.every_n_steps == 7
    assert progress_bar(enabled=False) is None
    with pytest.raises(ValueError, match="every_n_steps"):
        LineProgress(every_n_steps=0)


def test_lines_every_n_steps_and_at_epoch_ends(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    lines = LineProgress(every_n_steps=2, clock=clock)
    data = [{"image": torch.zeros(4, 3, 2, 2)}] * 4
    trainer = pl.Trainer(
        max_epochs=2, callbacks=[ThroughputMonitor(clock=clock), lines], logger=False,
        enable_checkpointing=False, enable_model_summary=False, accelerator="cpu",
        limit_val_batches=2, log_every_n_steps=2,  # images/s logged at the lines' steps
    )
    assert not any(isinstance(c, RichProgressBar) for c in trainer.callbacks)  # no second bar
    assert sum(isinstance(c, ProgressBar) for c in trainer.callbacks) == 1
    with caplog.at_level(logging.INFO, logger=LineProgress.__module__):
        trainer.fit(LoggingLinear(clock), DataLoader(data, batch_size=None),
                    DataLoader(data, batch_size=None))
    logged = [r.getMessage() for r in caplog.records if r.name == LineProgress.__module__]
    number = r"-?\d+(?:\.\d+)?(?:e[-+]\d+)?"
    # 8 steps in all, one second each: at step k, elapsed k s and 8 - k s to go.
    step_line = (
        r"epoch {e}/1 batch {b}/4 step {s} {p}% \| train/loss={n} \| 4\.0 images/s"
        r" \| elapsed 0:00:0{s} \| ETA 0:00:0{eta}"
    )
    expected = [
        step_line.format(e=0, b=2, s=2, p=25, n=number, eta=6),
        step_line.format(e=0, b=4, s=4, p=50, n=number, eta=4),
        r"Validation: 2 batches",
        rf"Validation done \| val/loss={number} \| elapsed 0:00:00",
        "end of " + step_line.format(e=0, b=4, s=4, p=50, n=number, eta=4),
        step_line.format(e=1, b=2, s=6, p=75, n=number, eta=2),
        step_line.format(e=1, b=4, s=8, p=100, n=number, eta=0),
        r"Validation: 2 batches",
        rf"Validation done \| val/loss={number} \| elapsed 0:00:00",
        "end of " + step_line.format(e=1, b=4, s=8, p=100, n=number, eta=0),
    ]
    assert len(logged) == len(expected), logged
    for line, pattern in zip(logged, expected):
        assert re.fullmatch(pattern, line), (line, pattern)


@pytest.mark.parametrize("enabled", [True, False])
def test_the_config_follows_trainer_enable_progress_bar(enabled: bool, tmp_path) -> None:
    """Lightning refuses a progress bar callback with enable_progress_bar=false: none is built."""
    cfg = compose_config([f"trainer.enable_progress_bar={str(enabled).lower()}"], tmp_path)
    bars = [c for c in instantiate_callbacks(cfg.callbacks) if isinstance(c, ProgressBar)]
    assert len(bars) == int(enabled)
    pl.Trainer(callbacks=bars, enable_progress_bar=enabled, logger=False)  # accepted
