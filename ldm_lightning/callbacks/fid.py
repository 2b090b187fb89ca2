"""FID during training: every N epochs, on a few samples, from the weights validation uses.

Runs on the first validation batch of an epoch, so with an EMA callback
(``callbacks.ema.ForeachEMA``, Lightning's ``EMAWeightAveraging``: it swaps the averaged weights
in at ``on_validation_epoch_start`` and out at ``on_validation_epoch_end``) the samples come from
the EMA weights whatever the order of the callbacks. Logs ``val/fid`` (an epoch metric, so it can be
``optimized_metric`` and ModelCheckpoint's monitor). Diffusion models are sampled; autoencoders
report the rFID of their reconstructions of the first ``num_samples`` images of ``split``.

A few hundred samples give a biased FID (FID_N is linear in 1/N): good to compare epochs and
runs at equal N, not to report; use ``python -m ldm_lightning.evaluate`` for that.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from ldm_lightning.metrics.evaluation import score_reconstructions, score_samples
from ldm_lightning.metrics.fid import GenerativeMetrics, build_feature_extractor, real_features


class FIDCallback(pl.Callback):
    """Logs ``log_name`` (default ``val/fid``) every ``every_n_epochs`` and at the last epoch.

    Args:
        every_n_epochs: compute on epochs ``N-1, 2N-1, ...`` (0-based) and the last one.
        num_samples: generated (or reconstructed) images per evaluation.
        batch_size: images per sampling batch.
        split: the real images (their features are cached in ``stats_dir``).
        num_real: real images used (None: the whole split).
        feature_extractor: "inception" or the ``_target_`` of an ``nn.Module``.
        sampling: extra :meth:`LatentDiffusionModule.sample` arguments (sampler, steps,
            guidance_scale, eta); the same ``seed`` every time, so epochs are comparable.
    """

    def __init__(
        self,
        stats_dir: str | Path,
        every_n_epochs: int = 5,
        num_samples: int = 256,
        batch_size: int = 64,
        split: str = "train",
        num_real: int | None = None,
        feature_extractor: Any = "inception",
        sampling: dict[str, Any] | None = None,
        seed: int = 0,
        log_name: str = "val/fid",
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"callbacks.fid.every_n_epochs must be >= 1, got {every_n_epochs}")
        if num_samples < 2:
            raise ValueError(f"callbacks.fid.num_samples must be >= 2, got {num_samples}")
        self.stats_dir = Path(stats_dir)
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.split = split
        self.num_real = num_real
        self.feature_extractor = feature_extractor
        self.sampling = dict(sampling or {})
        self.seed = seed
        self.log_name = log_name
        self.history: list[tuple[int, float]] = []
        self._extractor: torch.nn.Module | None = None
        self._real: torch.Tensor | None = None

    def due(self, trainer: pl.Trainer) -> bool:
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs
        return (epoch + 1) % self.every_n_epochs == 0 or last

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if (
            batch_idx != 0
            or dataloader_idx != 0
            or trainer.sanity_checking
            or not self.due(trainer)
        ):
            return
        value = self.compute(trainer.datamodule, pl_module) if trainer.is_global_zero else 0.0
        value = float(trainer.strategy.broadcast(value, src=0))
        self.history.append((trainer.current_epoch, value))
        pl_module.log(self.log_name, value, on_step=False, on_epoch=True, batch_size=1)

    def compute(self, datamodule: Any, pl_module: pl.LightningModule) -> float:
        """FID of ``num_samples`` images of ``pl_module`` against the real features."""
        if self._extractor is None:
            self._extractor = build_feature_extractor(self.feature_extractor)
            self._real = real_features(
                datamodule, self.split, self._extractor, self.stats_dir, self.num_real
            )
        self._extractor.to(pl_module.device)
        metrics = GenerativeMetrics(self._extractor, self._real)
        was_training = pl_module.training
        pl_module.eval()
        if hasattr(pl_module, "sample"):
            results, _ = score_samples(
                pl_module,
                datamodule,
                metrics,
                self.split,
                self.num_samples,
                self.batch_size,
                seed=self.seed,
                **self.sampling,
            )
            value = results["fid"]
        else:
            value = score_reconstructions(
                pl_module, datamodule, metrics, self.split, self.batch_size, self.num_samples
            )["rfid"]
        pl_module.train(was_training)
        return float(value)
