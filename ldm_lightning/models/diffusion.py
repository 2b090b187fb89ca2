"""Stage 3: latent diffusion (LDM sec. 3.2-3.3), or pixel-space DDPM with an identity first stage.

Trains the backbone with ``L = E_{z0, eps, t} w(t) ||target - model(input(z_t), time(t))||^2``
under a noise process (:mod:`~ldm_lightning.diffusion.processes`: DDPM eq. 14 for the default
``prediction="eps"`` and uniform ``w``, flow matching or EDM; LDM eq. 2 on normalised latents
``z0 = scale_factor * E(x)``) and samples with any sampler of :mod:`ldm_lightning.diffusion`.
Orchestration only: processes, samplers, guidance and the UNet live in their own modules.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from ldm_lightning.data.interface import DataSource
from ldm_lightning.diffusion import (
    PREDICTIONS,
    WEIGHTINGS,
    classifier_free_guidance,
    make_sampler,
    sample,
)
from ldm_lightning.diffusion.processes import make_process
from ldm_lightning.models.canvas import Canvas, latent_size
from ldm_lightning.models.checkpoints import SafeLoading
from ldm_lightning.models.conditioning import build_conditioning
from ldm_lightning.models.latent_space import LatentSpace
from ldm_lightning.models.spatial import SpatialHolder
from ldm_lightning.models.speed import apply_speed_switches, to_memory_format
from ldm_lightning.nn.backbone import input_multiple
from ldm_lightning.utils.targets import resolve_class

if TYPE_CHECKING:
    from ldm_lightning.models.noisy_classifier import NoisyClassifierModule

# model.unet of a config (or checkpoint) without _target_.
BACKBONE = "ldm_lightning.nn.unet.UNetModel"
BACKBONE_HINT = (
    "set model.unet._target_ to a torch.nn.Module subclass taking the UNet's arguments "
    f"(in_channels, out_channels, context_dim, ...; {BACKBONE})"
)
# model.optimizer of a config (or checkpoint) that leaves them out.
OPTIMIZER = {"_target_": "torch.optim.AdamW", "base_lr": 1e-4, "betas": (0.9, 0.999)}


class LatentDiffusionModule(SafeLoading, Canvas, SpatialHolder, LatentSpace, pl.LightningModule):
    """A time-conditional UNet on the latents of a frozen first stage. See the module docstring.

    Args:
        unet: the backbone (the name stays ``unet`` for every backbone, so checkpoints keep
            their keys): ``_target_``, a ``torch.nn.Module`` subclass (default
            :class:`~ldm_lightning.nn.unet.UNetModel`, also for checkpoints without it; or
            :class:`~ldm_lightning.nn.dit.DiT`, ``conf/model/backbone/``), and its keyword
            arguments; ``in_channels`` and ``out_channels`` default to the first stage's latent
            channels, ``input_size`` (where the class takes it) to the latent size, and the
            conditioning adds its own (``context_dim``, ``num_classes``). The latent size must
            be a multiple of what the class's ``input_multiple`` asks (the UNet's downsampling,
            the DiT's patch size; :mod:`ldm_lightning.nn.backbone`).
        first_stage: ``{"ckpt_path": ..., "identity": false}`` (see ``build_first_stage``).
        image_size: pixel resolution of the data.
        process: the noise process: ``_target_`` (a
            :class:`~ldm_lightning.diffusion.processes.NoiseProcess` subclass, DDPM when absent)
            and its options, as in ``conf/model/process/`` (ddpm | flow | edm).
        schedule: ``NoiseSchedule.make`` arguments (``kind``, ``timesteps``, ``beta_start``,
            ``beta_end``, ``zero_terminal_snr``) of the DDPM process.
        prediction: what the UNet predicts under the DDPM process: "eps" | "v" | "x0".
        loss_weighting: "uniform" (L_simple) or "min_snr" (Min-SNR-gamma, ``min_snr_gamma``),
            under the DDPM process.
        offset_noise: training noise ``eps + offset_noise * eps_c`` with ``eps_c`` one draw per
            sample and channel (Guttenberg 2023, "Diffusion with offset noise"), so the model
            learns to change an image's mean brightness; 0: off.
        scale_factor: latent scale; ``None`` estimates ``1/std(z)`` from ``scale_factor_batches``
            training batches before training and stores it in the checkpoint
            (:class:`~ldm_lightning.diffusion.latent_norm.LatentNormalizer`).
        latent_norm: "scalar" (``z0 = scale_factor * E(x)``, LDM sec. 4.3.2) or "channel"
            (``z0_c = (E(x)_c - mean_c) / std_c``, estimated like the scale and stored beside it;
            takes no fixed ``scale_factor``). A checkpoint's own normalisation wins on load.
        optimizer: ``_target_`` (AdamW) and its arguments (``betas``, ``weight_decay``, ...)
            with the rate keys ``base_lr``, ``scale_lr`` (CompVis' batch scaling),
            ``warmup_steps``, ``schedule``, ``min_lr_ratio``
            (:func:`~ldm_lightning.models.optim.build_optimizer`).
        sampling: defaults for validation samples and :meth:`sample` (``sampler``, ``steps``,
            ``eta``, ``timestep_spacing``); ``sampler`` is a name of
            :data:`~ldm_lightning.diffusion.SAMPLERS` or a ``{_target_: ..., **options}`` dict
            naming a :class:`~ldm_lightning.diffusion.Sampler` (``conf/model/sampler/``).
        conditioning: the config of a :class:`~ldm_lightning.models.conditioning.Conditioning`:
            ``_target_`` (its class) and its arguments, as in ``conf/model/conditioning/``, or a
            checkpoint's ``{kind: ..., ...}`` of earlier versions; None: unconditional.
        spatial: a condition concatenated to z_t (LDM sec. 3.3; ``conf/model/spatial/``:
            inpaint | upscale | semantic; :mod:`ldm_lightning.models.spatial`), whose channels
            are added to the backbone's ``in_channels``; None: none.
        compile: ``torch.compile`` the UNet in place when a Trainer sets the module up (true,
            or a dict of ``torch.compile`` options); parameter names are unchanged.
        channels_last: UNet weights and its inputs in NHWC layout (faster convolutions on GPUs).
    """

    kind = "latent_diffusion"
    default_optimizer = OPTIMIZER

    def __init__(
        self,
        *,
        unet: dict[str, Any],
        first_stage: dict[str, Any],
        image_size: int = 32,
        schedule: dict[str, Any] | None = None,
        prediction: str = "eps",
        loss_weighting: str = "uniform",
        min_snr_gamma: float = 5.0,
        process: dict[str, Any] | None = None,
        offset_noise: float = 0.0,
        scale_factor: float | None = None,
        scale_factor_batches: int = 16,
        latent_norm: str = "scalar",
        optimizer: dict[str, Any] | None = None,
        sampling: dict[str, Any] | None = None,
        num_log_images: int = 16,
        conditioning: dict[str, Any] | None = None,
        spatial: dict[str, Any] | None = None,
        compile: bool | dict[str, Any] = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"model.prediction={prediction!r} is unknown; valid: {PREDICTIONS}")
        if loss_weighting not in WEIGHTINGS:
            raise ValueError(
                f"model.loss_weighting={loss_weighting!r} is unknown; valid: {WEIGHTINGS}"
            )
        if offset_noise < 0:
            raise ValueError(f"model.offset_noise must be >= 0 (0: off), got {offset_noise}")
        self.process = make_process(process, schedule, prediction, loss_weighting, min_snr_gamma)
        self.save_hyperparameters()
        self.attach_latent_space(first_stage, scale_factor, latent_norm)

        channels = self.first_stage.latent_channels
        unet = dict(unet)
        target = unet.pop("_target_", BACKBONE)
        backbone = resolve_class(target, nn.Module, "backbone", BACKBONE_HINT)
        for key in ("in_channels", "out_channels"):  # missing or null: follow the first stage
            if unet.get(key) is None:
                unet[key] = channels
        # Like the first stage: record the class and a loaded text encoder's hyperparameters,
        # so the checkpoint alone rebuilds it.
        self.conditioner, self.hparams.conditioning = build_conditioning(conditioning)
        unet.update(self.conditioner.unet_kwargs())
        if unet["in_channels"] != channels or unet["out_channels"] != channels:
            raise ValueError(
                f"the first stage gives latents with {channels} channels, but model.unet has "
                f"in_channels={unet['in_channels']}, out_channels={unet['out_channels']}; set both "
                f"to {channels} (or null to follow the first stage)."
            )
        unet["in_channels"] += self.attach_spatial(spatial, channels)  # concat[z_t, c]
        self.backbone_multiple = input_multiple(backbone, unet)
        self.latent_size = latent_size(
            image_size, self.first_stage.factor, self.backbone_multiple, "data.image_size"
        )
        takes_size = "input_size" in inspect.signature(backbone).parameters
        if takes_size and unet.get("input_size") is None:  # missing or null: the latent size
            unet["input_size"] = self.latent_size
        self.unet = backbone(**unet)

    # ------------------------------------------------------------------ data
    def configure_model(self) -> None:
        apply_speed_switches([self.unet], self.hparams.compile, self.hparams.channels_last)

    def adopt_data(self, data: DataSource) -> None:
        """Check ``data``'s labels against the model's and take what the config left open (the
        class names), recorded in ``hparams.conditioning`` so the checkpoint keeps it."""
        self.hparams.conditioning.update(self.conditioner.adopt_data(data))

    def on_fit_start(self) -> None:
        make_sampler(self.sampling_settings()["sampler"])  # refused now, not at the first samples
        self.conditioner.prepare(self._data)
        super().on_fit_start()

    # ------------------------------------------------------------------ training
    def conditioning(self, batch: dict[str, Any], train: bool) -> dict[str, torch.Tensor]:
        """Denoiser keyword tensors (cross-attention context, class labels, ``concat``)."""
        return {**self.conditioner(batch, train), **self.spatial_condition(batch, train)}

    def diffusion_loss(
        self,
        z0: torch.Tensor,
        cond: dict[str, torch.Tensor],
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``mean_b w(t_b) ||target_b - model(input(z_t), time(t))_b||^2`` with t drawn by the
        process (DDPM: t ~ U{0..T-1}), eps ~ N(0, I) (plus offset noise).

        ``t`` and ``eps`` are drawn from ``generator`` (on its device) when given.
        """
        device = z0.device
        process = self.process.to(device)
        t = process.draw_t(z0.shape[0], generator, device)
        draw_on = generator.device if generator is not None else device
        noise = torch.randn(z0.shape, generator=generator, device=draw_on)
        if self.hparams.offset_noise:
            offset = torch.randn(*z0.shape[:2], *[1] * (z0.ndim - 2), generator=generator,
                                 device=draw_on)
            noise = noise + self.hparams.offset_noise * offset
        noise = noise.to(device)
        z_t = process.q_sample(z0, t, noise)
        network_input, time = process.network_input(z_t, t)
        output = self.denoiser(
            to_memory_format(network_input, self.hparams.channels_last), time, **cond
        ).float()
        per_sample = F.mse_loss(
            output, process.target(z0, noise, z_t, t), reduction="none"
        ).mean(dim=tuple(range(1, z0.ndim)))
        return (process.loss_weight(t) * per_sample).mean()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        z0 = self.latents(batch)
        # A per-rank generator: each DDP rank draws its own timesteps and noise.
        loss = self.diffusion_loss(z0, self.conditioning(batch, train=True), self.noise_generator)
        self.log(
            "train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=z0.shape[0]
        )
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    def _evaluate(self, batch: dict[str, Any], batch_idx: int, prefix: str) -> None:
        """Loss with noise and timesteps fixed by the batch index, comparable across epochs."""
        z0 = self.latents(batch)
        generator = torch.Generator().manual_seed(batch_idx)
        loss = self.diffusion_loss(z0, self.conditioning(batch, train=False), generator)
        self.log(
            f"{prefix}/loss",
            loss,
            prog_bar=prefix == "val",
            on_epoch=True,
            batch_size=z0.shape[0],
            sync_dist=True,
        )
        if batch_idx == 0 and prefix == "val":
            self.log_latent_norm()

    # ------------------------------------------------------------------ sampling
    def sampling_settings(
        self,
        sampler: str | Mapping[str, Any] | None = None,
        steps: int | None = None,
        eta: float | None = None,
        timestep_spacing: str | None = None,
    ) -> dict[str, Any]:
        """The sampler settings :meth:`sample` runs with: the arguments given, else the
        checkpoint's ``model.sampling``, else DDIM, 50 steps, the sampler's own eta (None: DDIM
        0, Euler ancestral 1) and the process's default spacing (None; DDPM: trailing).

        ``sampler`` is a name or a ``{_target_: ..., **options}`` dict (returned as a plain
        dict); a dict's ``eta`` replaces ``model.sampling.eta``, and an ``eta`` given replaces
        both."""
        given = {"sampler": sampler, "steps": steps, "eta": eta,
                 "timestep_spacing": timestep_spacing}
        settings = {"sampler": "ddim", "steps": 50, "eta": None, "timestep_spacing": None,
                    **(self.hparams.sampling or {})}
        settings.update({k: v for k, v in given.items() if v is not None})
        if isinstance(settings["sampler"], Mapping):
            spec = settings["sampler"] = dict(settings["sampler"])
            if "eta" in spec:  # the dict's eta replaces the saved one; a given eta, both
                spec["eta"] = settings["eta"] = spec["eta"] if eta is None else eta
        return settings

    @torch.no_grad()
    def sample(
        self,
        n: int = 16,
        sampler: str | Mapping[str, Any] | None = None,
        steps: int | None = None,
        guidance_scale: float = 1.0,
        labels: list[int] | None = None,
        prompts: list[str] | None = None,
        seed: int = 0,
        eta: float | None = None,
        return_trajectory: bool = False,
        progress: bool = False,
        negative_prompts: list[str] | None = None,
        unconditional: bool = False,
        guidance_rescale: float = 0.0,
        timestep_spacing: str | None = None,
        guidance_interval: list[float] | None = None,
        classifier: NoisyClassifierModule | None = None,
        classifier_scale: float = 0.0,
        image_size: int | None = None,
        init_images: torch.Tensor | None = None,
        strength: float = 1.0,
        spatial: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """``n`` images ``[n, 3, H, W]`` in [-1, 1]: sample latents, divide by the scale, decode.

        Conditional models take ``labels`` or ``prompts`` and apply classifier-free guidance
        ``eps_u + s (eps_c - eps_u)``, ``s = guidance_scale``, in one batched forward pass (Ho &
        Salimans 2022, eq. 6), optionally rescaled (``guidance_rescale``, Lin et al. 2024 eq. 16;
        see :mod:`ldm_lightning.diffusion.guidance`), only at noise levels sigma / alpha in
        ``guidance_interval`` ``[lo, hi]`` when given (Kynkäänniemi et al. 2024);
        ``unconditional=True`` samples with the null condition. With a ``classifier`` (a
        :class:`~ldm_lightning.models.noisy_classifier.NoisyClassifierModule` of this model's
        first stage, latent normalisation, process and classes) and ``classifier_scale`` s != 0,
        classifier guidance towards ``labels`` (Dhariwal & Nichol 2021, Algorithm 2:
        ``eps - s sigma grad log p(y | z_t)``), alone or on top of classifier-free guidance; the
        labels go to the classifier, and to the model too when it is class-conditional. The same
        ``seed`` gives the same images on any device. With ``return_trajectory`` also the
        latent-space predictions of x0 at every step (scaled latents ``[n, C, h, w]``).
        ``sampler`` (a name or a ``_target_`` dict, see :meth:`sampling_settings`), ``steps``,
        ``eta`` and ``timestep_spacing`` left None take the values of ``model.sampling`` saved
        with the checkpoint. ``image_size``: samples of that size (None: the training size;
        :mod:`~ldm_lightning.models.canvas`). ``init_images`` ``[1 or n, 3, H, W]``: edit them by
        SDEdit at ``strength`` (0: their reconstruction, 1: sampling from noise;
        :mod:`~ldm_lightning.diffusion.img2img`). A model with a spatial condition takes its
        pixel inputs (``spatial``, 1 or n items; :mod:`ldm_lightning.models.spatial`), guided
        against its null.
        """
        self.latent_norm.check_fitted()
        settings = self.sampling_settings(sampler, steps, eta, timestep_spacing)
        guide = None
        if classifier is not None:
            classifier = classifier.to(self.device).eval()
            guide = classifier.guide(self, labels, n, classifier_scale)
            if unconditional or getattr(self.conditioner, "inputs", None) != "labels":
                labels = None  # the classifier's alone
        elif classifier_scale:
            raise ValueError(
                f"classifier_scale={classifier_scale} needs a classifier (classifier_ckpt=...)"
            )
        cond, uncond = self.conditioner.for_sampling(
            n, labels, prompts, negative_prompts, unconditional
        )
        spatial_cond, spatial_uncond = self.spatial_for_sampling(n, spatial)
        cond = {**{k: v.to(self.device) for k, v in cond.items()}, **spatial_cond}
        uncond = {**{k: v.to(self.device) for k, v in uncond.items()}, **spatial_uncond}
        model_fn = classifier_free_guidance(
            self.denoiser,
            guidance_scale,
            cond,
            uncond,
            rescale=guidance_rescale,
            interval=guidance_interval,
            sigma_of_time=self.process.sigma_hat_of_time,
        )
        size = self.canvas(image_size)
        shape = (n, self.first_stage.latent_channels, size, size)
        x_init = None if init_images is None else self.init_latents(init_images, shape)
        result = sample(
            model_fn,
            shape,
            sampler=settings["sampler"],
            steps=settings["steps"],
            eta=settings["eta"],
            generator=torch.Generator().manual_seed(seed),
            device=self.device,
            progress=progress,
            return_trajectory=return_trajectory,
            timestep_spacing=settings["timestep_spacing"],
            process=self.process,
            guide=guide if classifier_scale else None,
            x_init=x_init,
            strength=strength,
        )
        z, trajectory = result if return_trajectory else (result, None)
        images = self.decode(z)
        return (images, trajectory) if return_trajectory else images

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``[B, C, h, w]`` -> images ``[B, 3, H, W]`` clamped to [-1, 1]."""
        return self.first_stage.decode(self.latent_norm.denormalize(z)).float().clamp(-1, 1)

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any]) -> dict[str, tuple[torch.Tensor, int]]:
        """A fixed-seed sample grid and a denoising trajectory (predicted x0 along the steps)."""
        n = self.hparams.num_log_images
        condition = self.conditioner.sampling_inputs(batch, n) | self.spatial_examples(batch, n)
        images, trajectory = self.sample(n=n, seed=0, return_trajectory=True, **condition)
        columns = min(8, len(trajectory))
        picks = torch.linspace(0, len(trajectory) - 1, columns).round().long().tolist()
        rows = min(4, n)
        frames = torch.stack([self.decode(trajectory[i][:rows].to(self.device)) for i in picks], 1)
        return {
            "samples": (images, max(1, int(n**0.5))),
            "trajectory": (frames.flatten(0, 1), columns),
        }
