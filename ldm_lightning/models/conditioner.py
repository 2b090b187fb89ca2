"""Stage 2: the conditioner ``tau_theta(y)`` (LDM sec. 3.3) and its CLIP-style pretraining.

Two condition encoders share one interface, ``encoder(condition) -> (context [B, L, D],
pooled [B, D])``:

- :class:`ClassEncoder`: a learned embedding of ``num_classes + 1`` entries (the last is the
  null class of classifier-free guidance), ``num_tokens`` context tokens per class.
- :class:`CaptionEncoder`: the caption tokenizer (learned from the training captions at the
  start of fit and kept in the state dict) and a transformer text encoder.

:class:`ConditionerModule` pretrains either one contrastively against a small image encoder
on the frozen first stage's latents (CLIP, Radford et al. 2021, sec. 2.3 and Fig. 3):
embeddings are L2-normalised, ``logits = exp(t) * I T^T`` with a learned log-temperature ``t``
(initialised to ``log(1/0.07)``, ``exp(t)`` clamped at 100) and the loss is the symmetric
cross-entropy over images and captions. Items of a batch that share a caption (or label) are
all positives, with equal target mass; with unique captions this is CLIP's loss exactly.
Validation logs retrieval recall@1/@5 over the distinct captions of the split (per rank).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm_lightning.data.tokenizer import EOS_ID, PAD_ID, CaptionTokenizer, dataset_captions
from ldm_lightning.models.checkpoints import SafeLoading, stamp
from ldm_lightning.models.first_stage import FirstStageHolder
from ldm_lightning.models.optim import adamw_with_warmup
from ldm_lightning.nn.image_encoder import LatentImageEncoder
from ldm_lightning.nn.text_encoder import TextEncoder

log = logging.getLogger(__name__)
ENCODERS = ("class", "text")


def check_labels(labels: Tensor | list[int], num_classes: int) -> Tensor:
    """``labels`` as a long tensor, or a ValueError naming the valid range ``0..K-1``."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        raise ValueError(
            f"class label {labels[bad][0].item()} is out of range: this model knows "
            f"{num_classes} classes, valid labels are 0..{num_classes - 1}"
        )
    return labels


class ClassEncoder(nn.Module):
    """Labels ``[B]`` in ``[0, num_classes]`` (``num_classes`` = null) -> context, pooled.

    The context is ``[B, num_tokens, width]``; the pooled vector is its mean over tokens.
    """

    def __init__(self, num_classes: int, width: int = 128, num_tokens: int = 1) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        self.null_index = num_classes
        self.width = width
        self.num_tokens = num_tokens
        self.embedding = nn.Embedding(num_classes + 1, num_tokens * width)

    def forward(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``labels`` [B] long -> (context [B, num_tokens, width], pooled [B, width])."""
        context = self.embedding(labels).view(-1, self.num_tokens, self.width)
        return context, context.mean(dim=1)


class CaptionEncoder(nn.Module):
    """Captions ``list[str]`` -> (context [B, context_length, width], pooled [B, width]).

    The tokenizer is not a parameter: it is learned by :meth:`fit_tokenizer` and travels in
    the state dict as extra state (its JSON), so every checkpoint holding this module can
    tokenize. ``config`` rebuilds the architecture (the weights and tokenizer then load).
    """

    def __init__(
        self,
        vocab_size: int = 512,
        context_length: int = 32,
        width: int = 128,
        layers: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.config = {
            "vocab_size": vocab_size,
            "context_length": context_length,
            "width": width,
            "layers": layers,
            "heads": heads,
            "mlp_ratio": mlp_ratio,
            "dropout": dropout,
        }
        self.width = width
        self.transformer = TextEncoder(
            vocab_size, context_length, width, layers, heads, mlp_ratio, dropout, PAD_ID, EOS_ID
        )
        self.tokenizer: CaptionTokenizer | None = None

    def fit_tokenizer(self, captions: list[str]) -> None:
        """Learn the tokenizer from the training captions (byte-level BPE)."""
        if not captions:
            raise ValueError("cannot learn a tokenizer from an empty list of captions")
        self.tokenizer = CaptionTokenizer.train(
            captions, self.config["vocab_size"], self.config["context_length"]
        )
        log.info(
            "Learned a tokenizer of %d tokens from %d captions",
            self.tokenizer.vocab_size,
            len(captions),
        )

    def get_extra_state(self) -> dict[str, Any]:
        return {"tokenizer": None if self.tokenizer is None else self.tokenizer.to_json()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        text = state["tokenizer"]
        self.tokenizer = (
            None
            if text is None
            else CaptionTokenizer.from_json(text, self.config["context_length"])
        )

    def forward(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        if self.tokenizer is None:
            raise RuntimeError(
                "the caption encoder has no tokenizer yet: it is learned from the training "
                "captions at the start of fit (or call fit_tokenizer(captions))"
            )
        tokens = self.tokenizer.encode(list(captions))
        return self.transformer(tokens.to(self.transformer.positional_embedding.device))


def contrastive_loss(
    image: Tensor, text: Tensor, logit_scale: Tensor | float, groups: Tensor | None = None
) -> Tensor:
    """Symmetric InfoNCE of CLIP (Radford et al. 2021, Fig. 3).

    ``logits = logit_scale * image @ text^T``; loss = mean of the cross-entropy over rows
    (image -> text) and over columns (text -> image). The target of row i is one-hot at i, or,
    with ``groups`` [B], uniform over the items j with ``groups[j] == groups[i]``.

    Args:
        image, text: L2-normalised embeddings ``[B, E]``.
        logit_scale: the inverse temperature ``exp(t)``.
        groups: integer id of each item's caption or label ``[B]``; None: all distinct.
    """
    logits = logit_scale * image @ text.T
    if groups is None:
        targets = torch.eye(len(image), device=image.device, dtype=logits.dtype)
    else:
        same = (groups[:, None] == groups[None, :]).to(logits.dtype)
        targets = same / same.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets.T)) / 2


def retrieval_recall(
    image: Tensor, text: Tensor, match: Tensor, ks: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    """Recall@k of image -> text and text -> image retrieval by cosine similarity.

    Args:
        image: ``[N, E]`` image embeddings; text: ``[M, E]`` embeddings of M distinct captions.
        match: ``[N]`` index of each image's caption in ``text``.

    Image -> text: a hit when the image's caption ranks in the top k of the M captions.
    Text -> image: a hit when one of the caption's images ranks in the top k of the N images
    (over captions with at least one image). Ties count in the item's favour.
    """
    sim = image @ text.T
    correct = sim[torch.arange(len(image)), match]
    rank_i2t = (sim > correct[:, None]).sum(dim=1)
    positive = match[:, None] == torch.arange(len(text))[None, :]
    best = sim.masked_fill(~positive, -math.inf).max(dim=0).values
    has_image = positive.any(dim=0)
    rank_t2i = (sim > best[None, :]).sum(dim=0)[has_image]
    result = {}
    for k in ks:
        result[f"recall@{k}_i2t"] = (rank_i2t < k).float().mean().item()
        result[f"recall@{k}_t2i"] = (rank_t2i < k).float().mean().item()
    return result


class ConditionerModule(SafeLoading, FirstStageHolder, pl.LightningModule):
    """A class or caption encoder, pretrained CLIP-style. See the module docstring.

    Args:
        encoder: "class" or "text".
        width: context width ``D`` (the diffusion UNet's ``context_dim``).
        text: :class:`CaptionEncoder` arguments other than ``width`` (vocab_size,
            context_length, layers, heads, mlp_ratio, dropout).
        num_classes, num_tokens: :class:`ClassEncoder` arguments.
        first_stage: ``{"ckpt_path": ...}`` of the frozen autoencoder
            (:func:`~ldm_lightning.models.first_stage.build_first_stage`).
        image_encoder: :class:`LatentImageEncoder` arguments other than the channels in and out.
        embed_dim: width of the joint image/caption embedding space.
        init_temperature: initial softmax temperature (CLIP: 0.07).
        max_logit_scale: clamp of ``exp(t)`` (CLIP: 100).
        optimizer: ``base_lr``, ``scale_lr``, ``betas``, ``weight_decay``, ``warmup_steps``.
    """

    kind = "conditioner"

    def __init__(
        self,
        *,
        encoder: str = "text",
        width: int = 128,
        text: dict[str, Any] | None = None,
        num_classes: int | None = None,
        num_tokens: int = 1,
        first_stage: dict[str, Any] | None = None,
        image_encoder: dict[str, Any] | None = None,
        embed_dim: int = 128,
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        optimizer: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"model.encoder={encoder!r} is unknown; valid: {ENCODERS}")
        if encoder == "class" and not num_classes:
            raise ValueError("model.encoder=class needs model.num_classes (e.g. 18 for shapes)")
        self.save_hyperparameters()
        self.attach_first_stage(first_stage)
        self.encoder: ClassEncoder | CaptionEncoder = (
            CaptionEncoder(width=width, **(text or {}))
            if encoder == "text"
            else ClassEncoder(num_classes, width, num_tokens)
        )
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
        if self.encoder.tokenizer is not None:
            return
        datamodule = self.trainer.datamodule
        if datamodule is None:
            raise ValueError(
                "the text conditioner learns its tokenizer from the datamodule's training "
                "captions: pass datamodule=... to fit, or call "
                "module.encoder.fit_tokenizer(captions) first"
            )
        self.encoder.fit_tokenizer(dataset_captions(datamodule.dataset("train")))

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
        first: dict[Any, int] = {}
        for index, key in enumerate(keys):
            first.setdefault(key, index)
        column = {key: j for j, key in enumerate(first)}
        match = torch.tensor([column[key] for key in keys])
        recall = retrieval_recall(images, texts[list(first.values())], match)
        for name, value in recall.items():
            self.log(f"{prefix}/{name}", value, sync_dist=True)
        self._outputs = []

    def configure_optimizers(self) -> dict[str, Any]:
        defaults = {"base_lr": 5e-4, "betas": (0.9, 0.98)}
        return adamw_with_warmup(self, self.hparams.optimizer, defaults)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stamp(checkpoint, self.kind, self)
