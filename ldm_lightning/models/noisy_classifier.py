"""The noisy classifier of classifier guidance (Dhariwal & Nichol 2021, "Diffusion models beat
GANs on image synthesis", sec. 4): ``p_phi(y | z_t, t)`` on the normalised latents of a frozen
first stage, under the noise process of the latent diffusion model it is to guide.

Training minimises the cross-entropy ``E_{z0, y, t, eps} -log p_phi(y | input(z_t), time(t))``
with ``z_t = alpha(t) z0 + sigma(t) eps`` and ``t`` drawn by the process at every noise level,
as ADM trains its classifiers, since guidance asks for ``grad log p(y | z_t)`` at every level
a sampler visits. Validation logs the loss and accuracy, and the accuracy at low and high
noise: over the samples whose noise level sigma / alpha is in the lowest, or highest, third of
the levels training draws. ``LatentDiffusionModule.sample(classifier=..., classifier_scale=s)``
guides with it (:meth:`NoisyClassifierModule.guide`), once :meth:`~NoisyClassifierModule.
check_guides` has found it in the same latent space as the LDM.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm_lightning.data.interface import DataSource
from ldm_lightning.diffusion.guidance import classifier_guidance
from ldm_lightning.diffusion.processes import NoiseProcess, make_process
from ldm_lightning.diffusion.samplers import Guide
from ldm_lightning.models.checkpoints import SafeLoading
from ldm_lightning.models.conditioning.base import expand
from ldm_lightning.models.conditioning.classes import adopt_classes, class_indices
from ldm_lightning.models.latent_space import LatentSpace
from ldm_lightning.nn.condition_encoders import check_labels
from ldm_lightning.utils.targets import resolve_class

# model.classifier of a config without _target_.
CLASSIFIER = "ldm_lightning.nn.classifier.EncoderUNetModel"
CLASSIFIER_HINT = (
    "set model.classifier._target_ to a torch.nn.Module subclass taking in_channels, "
    f"out_channels (the number of classes) and model.classifier's other keys ({CLASSIFIER})"
)
OPTIMIZER = {"_target_": "torch.optim.AdamW", "base_lr": 3e-4, "betas": (0.9, 0.999)}
# Training levels drawn (from a fixed seed) to split the noise levels into thirds.
BAND_DRAWS = 4096
# How far the latent normalisations of a classifier and the LDM it guides may differ (relative):
# both are estimated from a few training batches, which need not be the same ones.
NORM_RTOL = 0.01


def noise_to_signal(process: NoiseProcess, t: Tensor) -> Tensor:
    """sigma / alpha ``[B]`` at levels ``t`` (inf where alpha = 0)."""
    alpha, sigma = process.coefficients(t)
    return sigma / alpha


class NoisyClassifierModule(SafeLoading, LatentSpace, pl.LightningModule):
    """A classifier of noisy latents, trained on all noise levels. See the module docstring.

    Args:
        classifier: the network: ``_target_`` (default
            :class:`~ldm_lightning.nn.classifier.EncoderUNetModel`, the UNet's encoder half) and
            its arguments other than ``in_channels`` (the first stage's latent channels) and
            ``out_channels`` (``num_classes``).
        first_stage: ``{"ckpt_path": ..., "identity": false}``: the LDM's
            (:func:`~ldm_lightning.models.first_stage.build_first_stage`).
        num_classes: the number of classes; None: ``len(class_names)`` (a config's null takes
            the data's, :func:`~ldm_lightning.models.from_data.fill_from_data`).
        class_names: the name of each class; None: the data's, taken when training starts.
        process, schedule: the noise process (``conf/model/process/``) and the DDPM process's
            schedule, as the LDM's (:func:`~ldm_lightning.diffusion.processes.make_process`).
        scale_factor, scale_factor_batches, latent_norm: the latent normalisation, as the LDM's
            (:class:`~ldm_lightning.models.latent_space.LatentSpace`).
        optimizer: ``_target_`` (AdamW) and its arguments with the rate keys ``base_lr``,
            ``scale_lr``, ``warmup_steps``, ... (:func:`~ldm_lightning.models.optim.
            build_optimizer`).
    """

    kind = "noisy_classifier"
    default_optimizer = OPTIMIZER

    def __init__(
        self,
        *,
        classifier: dict[str, Any],
        first_stage: dict[str, Any],
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        process: dict[str, Any] | None = None,
        schedule: dict[str, Any] | None = None,
        scale_factor: float | None = None,
        scale_factor_batches: int = 16,
        latent_norm: str = "scalar",
        optimizer: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if num_classes is None and class_names is not None:
            num_classes = len(class_names)
        if not num_classes or num_classes < 2:
            raise ValueError(
                f"model.num_classes={num_classes}: a classifier needs at least 2 classes (null "
                "takes the number of labels of the data)"
            )
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"model.class_names has {len(class_names)} names for num_classes={num_classes}"
            )
        # It predicts no denoiser output; the DDPM process refuses eps (its default) only on a
        # zero-terminal-SNR schedule, on which a classifier still learns.
        prediction = "v" if (schedule or {}).get("zero_terminal_snr") else "eps"
        self.process = make_process(process, schedule, prediction)
        self.save_hyperparameters()
        self.hparams.num_classes = num_classes
        self.attach_latent_space(first_stage, scale_factor, latent_norm)
        net = dict(classifier)
        network = resolve_class(net.pop("_target_", CLASSIFIER), nn.Module, "classifier",
                                CLASSIFIER_HINT)
        self.classifier = network(
            in_channels=self.first_stage.latent_channels, out_channels=num_classes, **net
        )
        self._bands: tuple[float, float] | None = None

    @property
    def num_classes(self) -> int:
        return self.hparams.num_classes

    @property
    def class_names(self) -> list[str] | None:
        return self.hparams.class_names

    def adopt_data(self, data: DataSource) -> None:
        """Check that ``data``'s labels are the classifier's classes and take their names when
        it has none (saved with the checkpoint)."""
        self.hparams.class_names = adopt_classes(
            self.num_classes, self.class_names, data, "model", "the noisy classifier"
        )

    # ------------------------------------------------------------------ training
    def noisy_logits(
        self, z0: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(logits [B, K], t [B])``: the classifier on ``z_t = q_sample(z0, t, eps)`` with
        ``t`` drawn by the process and ``eps ~ N(0, I)`` (from ``generator`` when given)."""
        device = z0.device
        process = self.process.to(device)
        t = process.draw_t(z0.shape[0], generator, device)
        draw_on = generator.device if generator is not None else device
        noise = torch.randn(z0.shape, generator=generator, device=draw_on).to(device)
        z_t = process.q_sample(z0, t, noise)
        return self.classifier(*process.network_input(z_t, t)).float(), t

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        z0 = self.latents(batch)
        labels = check_labels(batch["label"], self.num_classes).to(self.device)
        logits, _ = self.noisy_logits(z0, self.noise_generator)
        loss = F.cross_entropy(logits, labels)
        size = len(labels)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=size)
        accuracy = (logits.argmax(dim=-1) == labels).float().mean()
        self.log("train/acc", accuracy, on_step=True, on_epoch=True, batch_size=size)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    def noise_bands(self) -> tuple[float, float]:
        """The noise levels sigma / alpha that cut the training levels into thirds (of
        ``BAND_DRAWS`` draws from a fixed seed)."""
        if self._bands is None:
            t = self.process.draw_t(BAND_DRAWS, torch.Generator().manual_seed(0))
            ratios = noise_to_signal(self.process, t).double().cpu()
            low, high = torch.quantile(ratios, torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
            self._bands = (float(low), float(high))
        return self._bands

    def _evaluate(self, batch: dict[str, Any], batch_idx: int, prefix: str) -> None:
        """Loss and accuracies with noise and levels fixed by the batch index."""
        z0 = self.latents(batch)
        labels = check_labels(batch["label"], self.num_classes).to(self.device)
        logits, t = self.noisy_logits(z0, torch.Generator().manual_seed(batch_idx))
        correct = (logits.argmax(dim=-1) == labels).float()
        metrics = {"loss": (F.cross_entropy(logits, labels), len(labels)),
                   "acc": (correct.mean(), len(labels))}
        ratios = noise_to_signal(self.process, t)
        low, high = self.noise_bands()
        for name, band in (("acc_low_noise", ratios <= low), ("acc_high_noise", ratios > high)):
            if band.any():
                metrics[name] = (correct[band].mean(), int(band.sum()))
        for name, (value, count) in metrics.items():
            self.log(f"{prefix}/{name}", value, prog_bar=prefix == "val" and name == "acc",
                     on_epoch=True, batch_size=count, sync_dist=True)
        if batch_idx == 0 and prefix == "val":
            self.log_latent_norm()

    # ------------------------------------------------------------------ guidance
    def wanted(self) -> str:
        names = f" or names: {', '.join(self.class_names)}" if self.class_names else ""
        return f"labels=[...] in 0..{self.num_classes - 1}{names}"

    def check(self, labels: Tensor | Sequence[int | str]) -> Tensor:
        """``labels`` given by index or by name as class indices ``[B]``, checked."""
        return class_indices(labels, self.num_classes, self.class_names, self.wanted())

    def guide(
        self, model: LatentSpace, labels: Tensor | Sequence[int | str] | None, n: int,
        scale: float,
    ) -> Guide:
        """Classifier guidance (:func:`~ldm_lightning.diffusion.guidance.classifier_guidance`)
        of ``n`` samples of the latent diffusion ``model`` towards ``labels`` (indices or
        names, each repeated to ``n`` as the LDM's own labels are) at ``scale``; refused unless
        :meth:`check_guides` finds ``model`` in this classifier's latent space."""
        if labels is None:
            raise ValueError(
                f"classifier guidance needs the classes to guide towards: pass {self.wanted()}"
            )
        self.check_guides(model)
        indices = expand(self.check(labels), n, "labels")
        return classifier_guidance(self.classifier, indices.to(self.device), scale,
                                   self.process.to(self.device))

    def check_guides(self, model: LatentSpace) -> None:
        """A ValueError naming the mismatch unless ``model`` samples in this classifier's
        latent space: the same first stage (the same checkpoint, or the same weights), the same
        latent normalisation (mode, and statistics within ``NORM_RTOL``), the same kind of
        noise process (a guide refuses levels its process puts elsewhere), and the same classes
        where ``model`` is class-conditional (number, and names where both have them)."""
        problems = []
        if not same_first_stage(self, model):
            problems.append(
                f"first stage {_first_stage_name(self)} vs the model's {_first_stage_name(model)}"
            )
        if not close_normalisations(self, model):
            problems.append(
                f"latent normalisation {self.latent_norm!r} vs the model's {model.latent_norm!r}"
            )
        if type(self.process) is not type(model.process):
            problems.append(
                f"noise process {type(self.process).__name__} vs the model's "
                f"{type(model.process).__name__}"
            )
        conditioner = getattr(model, "conditioner", None)
        if getattr(conditioner, "inputs", None) == "labels":
            theirs = conditioner.class_names
            if conditioner.num_classes != self.num_classes or (
                theirs and self.class_names and list(theirs) != list(self.class_names)
            ):
                problems.append(
                    f"{self.num_classes} classes {self.class_names or ''} vs the model's "
                    f"{conditioner.num_classes} {theirs or ''}"
                )
        if problems:
            raise ValueError(
                "this classifier cannot guide this model: " + "; ".join(problems) + ". Train "
                "the classifier on the model's first stage, data and process "
                "(python -m ldm_lightning.train +experiment=shapes_noisy_classifier "
                "model.first_stage.ckpt_path=<the model's autoencoder>)."
            )


def same_first_stage(a: LatentSpace, b: LatentSpace) -> bool:
    """Whether two stages hold the same first stage: of one kind and latent width, and from the
    same recorded checkpoint (sha256) or with equal weights (the same autoencoder read from a
    ``.ckpt`` and from its export)."""
    if type(a.first_stage) is not type(b.first_stage) or (
        a.first_stage.latent_channels != b.first_stage.latent_channels
    ):
        return False
    sha = a.hparams.first_stage.get("sha256")
    if sha is not None and sha == b.hparams.first_stage.get("sha256"):
        return True
    mine, theirs = a.first_stage.state_dict(), b.first_stage.state_dict()
    return mine.keys() == theirs.keys() and all(
        torch.equal(mine[k], theirs[k].to(mine[k].device)) for k in mine
    )


def close_normalisations(a: LatentSpace, b: LatentSpace) -> bool:
    """The same latent normalisation mode, and statistics within ``NORM_RTOL`` (per-channel
    means within ``NORM_RTOL`` of the std)."""
    x, y = a.latent_norm, b.latent_norm
    if x.mode != y.mode or not (x.fitted and y.fitted):
        return False
    if x.mode == "scalar":
        return math.isclose(x.scale, y.scale, rel_tol=NORM_RTOL)
    return len(x.std) == len(y.std) and all(
        math.isclose(sx, sy, rel_tol=NORM_RTOL) and abs(mx - my) <= NORM_RTOL * sy
        for mx, my, sx, sy in zip(x.mean, y.mean, x.std, y.std, strict=True)
    )


def _first_stage_name(stage: LatentSpace) -> str:
    record = stage.hparams.first_stage
    if record.get("identity"):
        return "identity"
    return str(record.get("ckpt_path") or f"sha256 {str(record.get('sha256'))[:12]}")
