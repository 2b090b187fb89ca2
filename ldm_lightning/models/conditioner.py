"""Stage 2: the conditioner ``tau_theta(y)`` (LDM sec. 3.3) and its CLIP-style pretraining.

:class:`ConditionerModule` pretrains a condition encoder
(:mod:`ldm_lightning.nn.condition_encoders`: class labels or captions) contrastively against a
small image encoder on the frozen first stage's latents (CLIP, Radford et al. 2021, sec. 2.3 and
Fig. 3): embeddings are L2-normalised, ``logits = exp(t) * I T^T`` with a learned
log-temperature ``t`` (initialised to ``log(1/0.07)``, ``exp(t)`` clamped at 100) and the loss is
:func:`~ldm_lightning.losses.contrastive.contrastive_loss`. Validation logs retrieval
recall@1/@5 over the distinct captions of the split (per rank,
:func:`~ldm_lightning.metrics.retrieval.recall_over_distinct`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm_lightning.losses.contrastive import contrastive_loss
from ldm_lightning.metrics.retrieval import recall_over_distinct
from ldm_lightning.models.checkpoints import SafeLoading, stamp
from ldm_lightning.models.first_stage import FirstStageHolder
from ldm_lightning.models.handshake import training_captions
from ldm_lightning.models.optim import build_optimizer
from ldm_lightning.nn.condition_encoders import CaptionEncoder, ClassEncoder, check_labels
from ldm_lightning.nn.image_encoder import LatentImageEncoder
from ldm_lightning.utils.targets import resolve_class

# model.encoder of a config without one, and the `encoder: class | text` of checkpoints of before.
ENCODERS = {
    "text": "ldm_lightning.nn.condition_encoders.CaptionEncoder",
    "class": "ldm_lightning.nn.condition_encoders.ClassEncoder",
}
ENCODER_HINT = (
    "choose it with model=conditioner_text or model=conditioner_class (model/encoder=<text | "
    "class>), or set model.encoder._target_ to a torch.nn.Module subclass taking width and "
    "model.encoder's other keys"
)
# model.optimizer of a config (or checkpoint) that leaves them out.
OPTIMIZER = {"_target_": "torch.optim.AdamW", "base_lr": 5e-4, "betas": (0.9, 0.98)}


def encoder_config(
    encoder: Mapping[str, Any] | str | None,
    text: Mapping[str, Any] | None = None,
    num_classes: int | None = None,
    num_tokens: int | None = None,
) -> dict[str, Any]:
    """``model.encoder`` as a dict with ``_target_``: the config's, or the caption encoder for
    None, or, for a checkpoint written before encoders were classes, its ``encoder: text``
    (arguments in ``text``) or ``encoder: class`` (``num_classes``, ``num_tokens``)."""
    if isinstance(encoder, str):
        if encoder not in ENCODERS:
            raise ValueError(f"model.encoder={encoder!r} is unknown; {ENCODER_HINT}")
        if encoder == "text":
            return {"_target_": ENCODERS["text"], **(text or {})}
        return {"_target_": ENCODERS["class"], "num_classes": num_classes,
                "num_tokens": num_tokens or 1}
    given = [k for k, v in {"text": text, "num_classes": num_classes,
                            "num_tokens": num_tokens}.items() if v is not None]
    if given:
        raise ValueError(
            f"{', '.join(given)}: the settings of a model.encoder string of before; set them in "
            "the model.encoder dict (e.g. model.encoder.num_classes=18)"
        )
    return {"_target_": ENCODERS["text"], **dict(encoder or {})}


def build_encoder(config: Mapping[str, Any], width: int) -> nn.Module:
    """The condition encoder of ``config`` (``_target_`` resolved by
    :func:`~ldm_lightning.utils.targets.resolve_class`, the other keys its arguments) with
    context width ``width``."""
    arguments = dict(config)
    cls = resolve_class(arguments.pop("_target_"), nn.Module, "condition encoder", ENCODER_HINT)
    try:
        return cls(width=width, **arguments)
    except TypeError as error:
        raise ValueError(f"model.encoder: {cls.__name__} {error}; {ENCODER_HINT}") from error


class ConditionerModule(SafeLoading, FirstStageHolder, pl.LightningModule):
    """A class or caption encoder, pretrained CLIP-style. See the module docstring.

    Args:
        encoder: the condition encoder: ``_target_`` (:class:`CaptionEncoder`,
            :class:`ClassEncoder`, or another ``torch.nn.Module`` with their interface) and its
            arguments other than ``width``; None: a default :class:`CaptionEncoder`.
        width: context width ``D`` (the diffusion UNet's ``context_dim``).
        first_stage: ``{"ckpt_path": ...}`` of the frozen autoencoder
            (:func:`~ldm_lightning.models.first_stage.build_first_stage`).
        image_encoder: :class:`LatentImageEncoder` arguments other than the channels in and out.
        embed_dim: width of the joint image/caption embedding space.
        init_temperature: initial softmax temperature (CLIP: 0.07).
        max_logit_scale: clamp of ``exp(t)`` (CLIP: 100).
        optimizer: ``_target_`` (AdamW) and its arguments with the rate keys ``base_lr``,
            ``scale_lr``, ``warmup_steps``, ...
            (:func:`~ldm_lightning.models.optim.build_optimizer`).
        text, num_classes, num_tokens: checkpoints written before encoders were classes
            (``encoder: "text" | "class"``); read by :func:`encoder_config`, saved as today's
            ``encoder`` dict.
    """

    kind = "conditioner"

    def __init__(
        self,
        *,
        encoder: Mapping[str, Any] | str | None = None,
        width: int = 128,
        first_stage: dict[str, Any] | None = None,
        image_encoder: dict[str, Any] | None = None,
        embed_dim: int = 128,
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        optimizer: dict[str, Any] | None = None,
        text: dict[str, Any] | None = None,
        num_classes: int | None = None,
        num_tokens: int | None = None,
    ) -> None:
        super().__init__()
        config = encoder_config(encoder, text, num_classes, num_tokens)
        self.save_hyperparameters(ignore=["text", "num_classes", "num_tokens"])
        self.hparams.encoder = config
        self.attach_first_stage(first_stage)
        self.encoder = build_encoder(config, width)
        self.image_encoder = LatentImageEncoder(
            self.first_stage.latent_channels, out_dim=embed_dim, **(image_encoder or {})
        )
        self.text_projection = nn.Linear(width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self._outputs: list[tuple[Tensor, Tensor, list[Any]]] = []

    # ------------------------------------------------------------------ data
    def setup(self, stage: str) -> None:
        if stage != "fit" or not isinstance(self.encoder, CaptionEncoder):
            return
        if self.encoder.tokenizer is None:
            self.encoder.fit_tokenizer(training_captions(self._data))

    def conditions(self, batch: dict[str, Any]) -> tuple[Any, Tensor]:
        """The encoder's input for a batch and an integer group id per item ``[B]``."""
        if isinstance(self.encoder, ClassEncoder):
            labels = check_labels(batch["label"], self.encoder.num_classes).to(self.device)
            return labels, labels
        captions = list(batch["caption"])
        ids: dict[str, int] = {}
        groups = torch.tensor([ids.setdefault(c, len(ids)) for c in captions], device=self.device)
        return captions, groups

    def embed(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised image and caption embeddings ``[B, E]`` and group ids ``[B]``."""
        if "latent" in batch:
            z = batch["latent"].float()
        else:
            with torch.no_grad():
                z = self.first_stage.encode(batch["image"])
        image = F.normalize(self.image_encoder(z.float()), dim=-1)
        condition, groups = self.conditions(batch)
        _, pooled = self.encoder(condition)
        text = F.normalize(self.text_projection(pooled), dim=-1)
        return image, text, groups

    def scale(self) -> Tensor:
        """``exp(t)`` clamped at ``max_logit_scale`` (CLIP sec. 2.5)."""
        return self.logit_scale.exp().clamp(max=self.hparams.max_logit_scale)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        image, text, groups = self.embed(batch)
        loss = contrastive_loss(image, text, self.scale(), groups)
        self.log(
            "train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(image)
        )
        self.log("train/logit_scale", self.scale(), on_step=True, batch_size=len(image))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._outputs = []

    def on_test_epoch_start(self) -> None:
        self._outputs = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_recall("val")

    def on_test_epoch_end(self) -> None:
        self._log_recall("test")

    def _evaluate(self, batch: dict[str, Any], prefix: str) -> None:
        image, text, groups = self.embed(batch)
        loss = contrastive_loss(image, text, self.scale(), groups)
        self.log(
            f"{prefix}/loss",
            loss,
            prog_bar=prefix == "val",
            on_epoch=True,
            batch_size=len(image),
            sync_dist=True,
        )
        keys = batch["label"].tolist() if isinstance(self.encoder, ClassEncoder) else None
        self._outputs.append((image.cpu(), text.cpu(), keys or list(batch["caption"])))

    def _log_recall(self, prefix: str) -> None:
        if not self._outputs:
            return
        images = torch.cat([o[0] for o in self._outputs])
        texts = torch.cat([o[1] for o in self._outputs])
        keys = [key for o in self._outputs for key in o[2]]
        recall = recall_over_distinct(images, texts, keys)
        for name, value in recall.items():
            self.log(f"{prefix}/{name}", value, sync_dist=True)
        self._outputs = []

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer, scheduler = build_optimizer(self, params, self.hparams.optimizer, OPTIMIZER)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stamp(checkpoint, self.kind, self)
