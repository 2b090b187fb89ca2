"""Stage 1: the perceptual-compression autoencoder (LDM sec. 3.1), VQ or KL regularised.

``x [B, 3, H, W] -> z = E(x) [B, embed_dim, H/f, W/f] -> x' = D(z)`` with f = 2^(len(ch_mult)-1).
Loss: L1/L2 + LPIPS + PatchGAN (hinge, adaptive weight, from ``disc_start``) + codebook and
commitment (VQ) or KL; the generator and discriminator are two optimizers stepped by hand
(Lightning manual optimisation), so gradient clipping is ``model.gradient_clip_val`` (max
global L2 norm per optimizer), not the trainer's. ``model.compile`` and ``model.channels_last``
speed up the encoder and decoder. Parameter names follow CompVis' first-stage models, so their
released checkpoints load with :meth:`AutoencoderModule.load_compvis_state_dict`.
"""

from __future__ import annotations

import itertools
import logging
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ldm_lightning.diffusion.latent_norm import LatentNormalizer
from ldm_lightning.losses.autoencoder import AutoencoderLoss
from ldm_lightning.losses.perceptual import build_lpips
from ldm_lightning.models.checkpoints import SafeLoading, read_checkpoint, stamp
from ldm_lightning.models.optim import scaled_learning_rate, schedule_lambda
from ldm_lightning.models.speed import apply_speed_switches, to_memory_format
from ldm_lightning.nn.distributions import DiagonalGaussian
from ldm_lightning.nn.encoder_decoder import Decoder, Encoder
from ldm_lightning.nn.quantizer import VectorQuantizer

log = logging.getLogger(__name__)
REGULARIZERS = ("vq", "kl")


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


class AutoencoderModule(SafeLoading, pl.LightningModule):
    """VQ or KL autoencoder with its GAN training loop. See the module docstring."""

    kind = "autoencoder"

    def __init__(
        self,
        *,
        regularizer: str = "vq",
        image_size: int = 256,
        in_channels: int = 3,
        ch: int = 128,
        ch_mult: Iterable[int] = (1, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Iterable[int] = (),
        dropout: float = 0.0,
        z_channels: int = 3,
        embed_dim: int = 3,
        n_embed: int = 8192,
        beta: float = 0.25,
        ema_codebook: bool = False,
        ema_decay: float = 0.99,
        restart_dead_codes: bool = False,
        loss: dict[str, Any] | None = None,
        perceptual: dict[str, Any] | None = None,
        optimizer: dict[str, Any] | None = None,
        num_log_images: int = 8,
        gradient_clip_val: float | None = None,
        compile: bool | dict[str, Any] = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        if regularizer not in REGULARIZERS:
            raise ValueError(f"model.regularizer={regularizer!r} is unknown; valid: {REGULARIZERS}")
        ch_mult = tuple(ch_mult)
        self.factor = 2 ** (len(ch_mult) - 1)
        if image_size % self.factor:
            raise ValueError(
                f"data.image_size={image_size} is not divisible by the autoencoder's downsampling "
                f"factor f={self.factor} (ch_mult={list(ch_mult)}); use an image_size that is a "
                f"multiple of {self.factor}."
            )
        net = dict(
            ch=ch,
            ch_mult=ch_mult,
            num_res_blocks=num_res_blocks,
            attn_resolutions=tuple(attn_resolutions),
            resolution=image_size,
            z_channels=z_channels,
            dropout=dropout,
        )
        self.regularizer = regularizer
        self.embed_dim = embed_dim
        self.encoder = Encoder(in_channels=in_channels, double_z=regularizer == "kl", **net)
        self.decoder = Decoder(out_ch=in_channels, in_channels=in_channels, **net)
        moments = 2 if regularizer == "kl" else 1
        self.quant_conv = nn.Conv2d(moments * z_channels, moments * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        if regularizer == "vq":
            self.quantize = VectorQuantizer(
                n_embed,
                embed_dim,
                beta=beta,
                use_ema=ema_codebook,
                ema_decay=ema_decay,
                restart_dead_codes=restart_dead_codes,
            )
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
            regularizer=regularizer,
            perceptual=self.perceptual,
            disc_in_channels=in_channels,
            **loss_kwargs,
        )
        # Batches trained so far. Lightning's global_step counts optimizer steps (G and D),
        # which would make disc_start depend on whether D is already stepping.
        self.register_buffer("train_batches", torch.zeros((), dtype=torch.long))
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self._code_counts: torch.Tensor | None = None

    # ------------------------------------------------------------------ public API
    @property
    def latent_channels(self) -> int:
        return self.embed_dim

    def encode(
        self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``x [B, 3, H, W]`` in [-1, 1] -> latent ``[B, embed_dim, H/f, W/f]``.

        VQ: the pre-quantisation latent (as CompVis' VQModelInterface; :meth:`decode`
        quantises). KL: the posterior mean, or a sample when ``sample=True``.
        """
        moments = self.quant_conv(self.encoder(x))
        if self.regularizer == "vq":
            return moments
        posterior = DiagonalGaussian(moments)
        return posterior.sample(generator) if sample else posterior.mode()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent ``[B, embed_dim, h, w]`` -> image ``[B, 3, h*f, w*f]`` (VQ: quantised first)."""
        if self.regularizer == "vq":
            z, _, _ = self.quantize(z)
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Reconstruct ``x``; returns ``(x_hat, regulariser loss, info)``.

        The regulariser is the VQ codebook + beta * commitment loss (VQ-VAE eq. 3), or the KL
        divergence to N(0, I) summed over latent dimensions and averaged over the batch.
        """
        moments = self.quant_conv(self.encoder(x))
        if self.regularizer == "vq":
            z, reg, info = self.quantize(moments)
        else:
            posterior = DiagonalGaussian(moments)
            z = posterior.sample() if sample_posterior else posterior.mode()
            reg, info = posterior.kl().mean(), {}
        return self.decoder(self.post_quant_conv(z)), reg, info

    @torch.no_grad()
    def estimate_scale_factor(
        self, batches: Iterable[dict[str, torch.Tensor]], max_batches: int = 16
    ) -> float:
        """``1 / std(z)`` of this autoencoder's latents over up to ``max_batches`` batches
        (:class:`~ldm_lightning.diffusion.latent_norm.LatentNormalizer`)."""
        images = (
            batch["image"].to(self.device) for batch in itertools.islice(batches, max_batches)
        )
        return LatentNormalizer().fit(self.encode(x) for x in images).scale

    # ------------------------------------------------------------------ training
    def configure_model(self) -> None:
        apply_speed_switches(
            [self.encoder, self.decoder], self.hparams.compile, self.hparams.channels_last
        )

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[dict[str, Any]]]:
        """Adam for the autoencoder and for the discriminator, each with the schedule of
        ``optimizer`` (:func:`~ldm_lightning.models.optim.lr_factor`; ``constant`` as CompVis),
        stepped once per training batch."""
        cfg = {
            "base_lr": 4.5e-6,
            "scale_lr": True,
            "betas": (0.5, 0.9),
            "schedule": "constant",
            **(self.hparams.optimizer or {}),
        }
        lr = scaled_learning_rate(self, cfg["base_lr"], cfg["scale_lr"])
        log.info("Autoencoder learning rate %.3g", lr)
        disc_params = set(map(id, self.loss.discriminator.parameters()))
        gen_params = [p for p in self.parameters() if p.requires_grad and id(p) not in disc_params]
        opt_g = torch.optim.Adam(gen_params, lr=lr, betas=tuple(cfg["betas"]))
        opt_d = torch.optim.Adam(
            self.loss.discriminator.parameters(), lr=lr, betas=tuple(cfg["betas"])
        )
        factor = schedule_lambda(self, cfg)
        schedulers = [
            {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor), "interval": "step"}
            for opt in (opt_g, opt_d)
        ]
        return [opt_g, opt_d], schedulers

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        opt_g, opt_d = self.optimizers()
        x = to_memory_format(batch["image"], self.hparams.channels_last)
        step = int(self.train_batches)
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

    def load_compvis_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a CompVis first-stage ``state_dict`` (``loss.*`` ignored) into this module.

        The architecture hyperparameters must match the checkpoint's config. Keys this module
        has and CompVis' lacks are only EMA/usage buffers of the quantiser and our step counter,
        which keep their initial values; anything else missing or unexpected is an error.
        """
        weights = {k: v for k, v in state_dict.items() if not k.startswith("loss.")}
        ours = {k for k in self.state_dict() if not k.startswith("loss.")}
        missing = ours - set(weights)
        unexpected = set(weights) - ours
        allowed_missing = {
            k
            for k in missing
            if k == "train_batches"
            or (k.startswith("quantize.") and k != "quantize.embedding.weight")
        }
        if unexpected or missing - allowed_missing:
            raise ValueError(
                "the CompVis checkpoint does not match this autoencoder's architecture: "
                f"missing {sorted(missing - allowed_missing)[:8]}, "
                f"unexpected {sorted(unexpected)[:8]}. Set model.ch, ch_mult, num_res_blocks, "
                "z_channels, embed_dim, n_embed as in its config.yaml."
            )
        self.load_state_dict(weights, strict=False)

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
