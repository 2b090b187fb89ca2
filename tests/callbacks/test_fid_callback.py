"""The FID callback: when it runs, what it logs, and that it samples from the EMA weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EMAWeightAveraging
from torch import nn
from torch.utils.data import DataLoader

from ldm_lightning.callbacks.fid import FIDCallback
from ldm_lightning.data.shapes import ShapesDataModule
from ldm_lightning.metrics.fid import GenerativeMetrics, extract


class MeanColour(nn.Module):
    """Per-channel means and standard deviations (6-D): features of the colour of an image."""

    num_features = 6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


class Toy(pl.LightningModule):
    """One parameter ``level``, pulled towards 1; samples are noise around ``tanh(level)``."""

    def __init__(self) -> None:
        super().__init__()
        self.level = nn.Parameter(torch.zeros(()))
        self.sampled_levels: list[float] = []
        self.trained_levels: list[float] = []

    def training_step(self, batch, batch_idx):
        return (self.level - 1) ** 2

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.trained_levels.append(self.level.item())

    def validation_step(self, batch, batch_idx) -> None:
        self.log("val/loss", (self.level - 1).detach() ** 2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0, **kwargs) -> torch.Tensor:
        self.sampled_levels.append(self.level.item())
        return toy_images(self.level.item(), n, seed)


def toy_images(level: float, n: int, seed: int) -> torch.Tensor:
    noise = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return (torch.tanh(torch.tensor(level)) + 0.3 * noise).clamp(-1, 1)


class ToyData(ShapesDataModule):
    def train_dataloader(self):
        return DataLoader(range(4), batch_size=1)

    def val_dataloader(self):
        return DataLoader(range(2), batch_size=1)


def fit(tmp_path: Path, callbacks: list[pl.Callback], epochs: int = 3) -> tuple[Toy, pl.Trainer]:
    model = Toy()
    trainer = pl.Trainer(
        max_epochs=epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1,
        accelerator="cpu", devices=1,
    )
    trainer.fit(model, datamodule=ToyData(image_size=8, num_train=16, num_val=4, num_test=4))
    return model, trainer


def fid_callback(tmp_path: Path, **kwargs) -> FIDCallback:
    settings = dict(stats_dir=tmp_path / "stats", num_samples=12, batch_size=5,
                    feature_extractor=MeanColour(), **kwargs)
    return FIDCallback(**settings)


@pytest.mark.parametrize("ema_first", [True, False])
def test_fid_uses_the_ema_weights_whatever_the_callback_order(tmp_path, ema_first) -> None:
    fid = fid_callback(tmp_path, every_n_epochs=1)
    ema = EMAWeightAveraging(decay=0.8)
    model, trainer = fit(tmp_path, [ema, fid] if ema_first else [fid, ema])
    # Sanity checking is skipped; then one FID per epoch, batches of 5, 5, 2.
    assert [epoch for epoch, _ in fid.history] == [0, 1, 2]
    assert len(model.sampled_levels) == 9
    final_ema = model.level.item()  # EMAWeightAveraging copies the average in at fit end
    assert model.sampled_levels[-1] == pytest.approx(final_ema)
    assert abs(final_ema - model.trained_levels[-1]) > 0.05  # EMA differs from the raw weights

    real = torch.stack([item["image"] for item in trainer.datamodule.build_split("train")])
    metrics = GenerativeMetrics(MeanColour(), extract(MeanColour(), real)[0])
    for seed, n in enumerate([5, 5, 2]):
        metrics.update(toy_images(final_ema, n, seed))
    assert fid.history[-1][1] == pytest.approx(metrics.compute()["fid"], rel=1e-5)
    assert trainer.callback_metrics["val/fid"].item() == pytest.approx(fid.history[-1][1])


def test_every_n_epochs_and_the_last_epoch(tmp_path) -> None:
    fid = fid_callback(tmp_path, every_n_epochs=2)
    fit(tmp_path, [fid], epochs=3)
    assert [epoch for epoch, _ in fid.history] == [1, 2]


def test_real_features_are_extracted_once_per_run(tmp_path) -> None:
    class Counting(MeanColour):
        calls = 0

        def forward(self, x):
            Counting.calls += 1
            return super().forward(x)

    fid = fid_callback(tmp_path, every_n_epochs=1, num_real=8)
    fid.feature_extractor = Counting()
    fit(tmp_path, [fid], epochs=2)
    # Real: 8 images in one batch of 64; generated: 3 batches per epoch.
    assert Counting.calls == 1 + 2 * 3


def test_bad_settings_are_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="every_n_epochs must be >= 1"):
        fid_callback(tmp_path, every_n_epochs=0)
    with pytest.raises(ValueError, match="num_samples must be >= 2"):
        FIDCallback(stats_dir=tmp_path, num_samples=1)


def test_a_module_that_cannot_sample_is_scored_on_its_reconstructions(tmp_path) -> None:
    class Halving(pl.LightningModule):
        """An "autoencoder" whose reconstruction is the image at half contrast."""

        def forward(self, x, sample_posterior=True):
            return x / 2, None, {}

    datamodule = ToyData(image_size=8, num_train=16, num_val=4, num_test=4)
    fid = FIDCallback(tmp_path, num_samples=6, batch_size=4, feature_extractor=MeanColour())
    value = fid.compute(datamodule, Halving())
    real = torch.stack([item["image"] for item in datamodule.build_split("train")])
    metrics = GenerativeMetrics(MeanColour(), extract(MeanColour(), real)[0])
    metrics.update(real[:6] / 2)  # the first num_samples images, in batches of 4 and 2
    assert value == pytest.approx(metrics.compute()["fid"], rel=1e-5)
