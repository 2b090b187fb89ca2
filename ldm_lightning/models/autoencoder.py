"""Stage 1: training the perceptual-compression autoencoder (LDM sec. 3.1), VQ or KL regularised.

:class:`AutoencoderModule` is a :class:`~ldm_lightning.nn.first_stage.FirstStage` (the network:
``encode``, ``decode``, CompVis' parameter names) with its training added: loss = L1/L2 + LPIPS
+ PatchGAN (hinge, adaptive weight, from ``disc_start``) + codebook and commitment (VQ) or KL;
the generator and discriminator are two optimizers stepped by hand (Lightning manual
optimisation), so gradient clipping is ``model.gradient_clip_val`` (max global L2 norm per
optimizer), not the trainer's. ``model.compile`` and ``model.channels_last`` speed up the
encoder and decoder. Its checkpoint holds the network's weights under the names CompVis uses
(a later stage copies those, :mod:`ldm_lightning.models.first_stage`) and the discriminator's
under ``loss.*``.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ldm_lightning.diffusion.latent_norm import LatentStats
from ldm_lightning.losses.autoencoder import AutoencoderLoss
from ldm_lightning.losses.perceptual import build_lpips
from ldm_lightning.models.checkpoints import SafeLoading, read_checkpoint, stamp
from ldm_lightning.models.handshake import DataUser
from ldm_lightning.models.optim import build_optimizer
from ldm_lightning.models.speed import apply_speed_switches, to_memory_format
from ldm_lightning.nn.first_stage import FirstStage

# model.optimizer of a config (or checkpoint) that leaves them out (CompVis' vq-f4).
OPTIMIZER = {
    "_target_": "torch.optim.Adam", "base_lr": 4.5e-6, "scale_lr": True, "betas": (0.5, 0.9)
}


class LazyPerceptual:
    """LPIPS held outside the module tree: fixed pretrained weights, built on first use.

    Not a registered submodule, so it is not checkpointed (it is not learned) and loading an
    autoencoder for a later stage never downloads the LPIPS backbone.
    """

    def __init__(self, factory: Callable[[], nn.Module]) -> None:
        self.factory = factory
        self.net: nn.Module | None = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.net is None:
            self.net = self.factory()
        first = next(self.net.parameters())
        if first.device != x.device:
            self.net.to(x.device)
        return self.net(x, y)


class AutoencoderModule(SafeLoading, DataUser, FirstStage, pl.LightningModule):
    """A :class:`FirstStage` with its GAN training loop. See the module docstring.

    Args:
        loss: :class:`~ldm_lightning.losses.autoencoder.AutoencoderLoss` arguments (weights,
            ``disc_start``, discriminator size).
        perceptual: LPIPS arguments (:func:`~ldm_lightning.losses.perceptual.build_lpips`).
        optimizer: ``_target_`` (Adam) and its arguments (``betas``, ...) with the rate keys
            ``base_lr``, ``scale_lr``, ``schedule``, ... (see :meth:`configure_optimizers`).
        num_log_images: reconstructions in the logged image grid.
        gradient_clip_val: max global L2 norm of each optimizer's gradients; None: off.
        compile, channels_last: speed switches of the encoder and decoder.
        **architecture: the :class:`FirstStage` arguments (``regularizer``, ``image_size``,
            ``ch``, ``ch_mult``, ``z_channels``, ``embed_dim``, ``n_embed``, ...).
    """

    kind = "autoencoder"

    def __init__(
        self,
        *,
        loss: dict[str, Any] | None = None,
        perceptual: dict[str, Any] | None = None,
        optimizer: dict[str, Any] | None = None,
        num_log_images: int = 8,
        gradient_clip_val: float | None = None,
        compile: bool | dict[str, Any] = False,
        channels_last: bool = False,
        **architecture: Any,
    ) -> None:
        super().__init__(**architecture)
        self.save_hyperparameters()
        self.hparams.update(self.config)  # the architecture's defaults too
        self.automatic_optimization = False
        image_size = self.config["image_size"]
        loss_kwargs = dict(loss or {})
        disc_layers = loss_kwargs.get("disc_num_layers", 3)
        if image_size < 3 * 2**disc_layers:
            # n stride-2 convs, then two 4x4 convs with padding 1, need >= 3 px left.
            raise ValueError(
                f"data.image_size={image_size} is too small for a {disc_layers}-layer PatchGAN "
                f"discriminator (needs >= {3 * 2**disc_layers} px); lower "
                "model.loss.disc_num_layers or use larger images."
            )
        perceptual_kwargs = dict(perceptual or {})
        self.perceptual = (
            LazyPerceptual(lambda: build_lpips(**perceptual_kwargs))
            if loss_kwargs.get("perceptual_weight", 1.0) > 0
            else None
        )
        self.loss = AutoencoderLoss(
            regularizer=self.regularizer,
            perceptual=self.perceptual,
            disc_in_channels=self.config["in_channels"],
            **loss_kwargs,
        )
        # Batches trained so far. Lightning's global_step counts optimizer steps (G and D),
        # which would make disc_start depend on whether D is already stepping.
        self.register_buffer("train_batches", torch.zeros((), dtype=torch.long))
        # Its value on the host, read once a fit (after any checkpoint is restored): reading the
        # buffer every step would wait for the device.
        self._batch_clock: int | None = None
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self._code_counts: torch.Tensor | None = None

    @torch.no_grad()
    def estimate_scale_factor(
        self, batches: Iterable[dict[str, torch.Tensor]], max_batches: int = 16
    ) -> float:
        """``1 / std(z)`` of this autoencoder's latents over up to ``max_batches`` batches
        (:class:`~ldm_lightning.diffusion.latent_norm.LatentStats`)."""
        images = (
            batch["image"].to(self.device) for batch in itertools.islice(batches, max_batches)
        )
        return LatentStats.of(self.encode(x) for x in images).inverse_std()

    # ------------------------------------------------------------------ training
    def configure_model(self) -> None:
        apply_speed_switches(
            [self.encoder, self.decoder], self.hparams.compile, self.hparams.channels_last
        )

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[dict[str, Any]]]:
        """``model.optimizer`` (:func:`~ldm_lightning.models.optim.build_optimizer`; Adam as
        CompVis) for the autoencoder and for the discriminator, each with its schedule
        (``constant`` as CompVis), stepped once per training batch."""
        disc_params = set(map(id, self.loss.discriminator.parameters()))
        gen_params = [p for p in self.parameters() if p.requires_grad and id(p) not in disc_params]
        built = [
            build_optimizer(self, params, self.hparams.optimizer, OPTIMIZER)
            for params in (gen_params, self.loss.discriminator.parameters())
        ]
        return [opt for opt, _ in built], [scheduler for _, scheduler in built]

    def on_train_start(self) -> None:
        self._batch_clock = int(self.train_batches)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        opt_g, opt_d = self.optimizers()
        x = to_memory_format(batch["image"], self.hparams.channels_last)
        if self._batch_clock is None:  # a step outside trainer.fit
            self._batch_clock = int(self.train_batches)
        step = self._batch_clock
        x_hat, reg, info = self(x)

        self.toggle_optimizer(opt_g)
        loss_g, logs = self.loss.generator_loss(x, x_hat, reg, step, self.decoder.last_layer)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss_g)
        self._clip_gradients(opt_g)
        opt_g.step()
        self.untoggle_optimizer(opt_g)

        if step >= self.loss.disc_start:
            self.toggle_optimizer(opt_d)
            loss_d, logs_d = self.loss.discriminator_loss(x, x_hat, step)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(loss_d)
            self._clip_gradients(opt_d)
            opt_d.step()
            self.untoggle_optimizer(opt_d)
            logs.update(logs_d)
        sched_g, sched_d = self.lr_schedulers()  # manual optimisation: once per batch
        sched_g.step()
        with warnings.catch_warnings():
            # Before disc_start D has not stepped yet; its rate follows the same batch clock,
            # so PyTorch's "scheduler before optimizer" warning does not apply.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            sched_d.step()
        self.train_batches += 1
        self._batch_clock += 1

        logs.update({k: info[k] for k in ("perplexity", "usage") if k in info})
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, on_step=True, on_epoch=False)
        self.log("train/rec_loss", logs["rec"], prog_bar=True, on_step=True, on_epoch=False)

    def _clip_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Rescale ``optimizer``'s gradients to global L2 norm <= ``gradient_clip_val``."""
        if self.hparams.gradient_clip_val:
            self.clip_gradients(
                optimizer,
                gradient_clip_val=self.hparams.gradient_clip_val,
                gradient_clip_algorithm="norm",
            )

    # ------------------------------------------------------------------ evaluation
    def on_validation_epoch_start(self) -> None:
        self._code_counts = None

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_codebook("val")

    def on_test_epoch_start(self) -> None:
        self._code_counts = None

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_codebook("test")

    def _evaluate(self, batch: dict[str, Any], prefix: str) -> None:
        x = batch["image"]
        x_hat, reg, info = self(x, sample_posterior=False)
        x01, x_hat01 = (x + 1) / 2, (x_hat.clamp(-1, 1) + 1) / 2
        self.val_psnr(x_hat01, x01)
        self.val_ssim(x_hat01, x01)
        metrics = {
            "rec_loss": (x - x_hat).abs().mean(),
            "reg": reg,
            "psnr": self.val_psnr,
            "ssim": self.val_ssim,
        }
        if self.perceptual is not None:
            metrics["lpips"] = self.perceptual(x, x_hat.clamp(-1, 1)).mean()
        self.log_dict(
            {f"{prefix}/{k}": v for k, v in metrics.items()},
            on_step=False,
            on_epoch=True,
            prog_bar=False,
            batch_size=x.shape[0],
        )
        if "indices" in info:
            counts = torch.bincount(info["indices"].flatten(), minlength=self.quantize.n_embed)
            self._code_counts = counts if self._code_counts is None else self._code_counts + counts

    def _log_codebook(self, prefix: str) -> None:
        """Codebook usage (fraction of codes used) and perplexity over the whole epoch."""
        if self._code_counts is None:
            return
        counts = self.all_gather(self._code_counts).reshape(-1, self._code_counts.numel()).sum(0)
        probs = counts.double() / counts.sum().clamp_min(1)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
        self.log(f"{prefix}/codebook_usage", (counts > 0).float().mean(), sync_dist=False)
        self.log(f"{prefix}/perplexity", entropy.exp().float(), sync_dist=False)

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any]) -> dict[str, tuple[torch.Tensor, int]]:
        """Grids for the image logger: inputs (top row) over reconstructions (bottom row)."""
        x = batch["image"][: self.hparams.num_log_images].to(self.device)
        x_hat, _, _ = self(x, sample_posterior=False)
        return {"reconstructions": (torch.cat([x, x_hat.clamp(-1, 1)]), x.shape[0])}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stamp(checkpoint, self.kind, self)

    @classmethod
    def from_compvis_checkpoint(
        cls, path: str | Path, trust: bool = False, **hparams: Any
    ) -> AutoencoderModule:
        """Build an autoencoder with ``hparams`` and load CompVis weights from ``path``.

        CompVis' released ``model.ckpt`` files pickle Lightning's ``ModelCheckpoint`` class as
        a dict key; the safe reader maps that name to a placeholder, so they load with
        ``weights_only=True`` and ``trust`` is not needed for them.
        """
        checkpoint = read_checkpoint(path, "compvis_ckpt_path", trust)
        module = cls(**hparams)
        module.load_compvis_state_dict(checkpoint["state_dict"])
        return module
