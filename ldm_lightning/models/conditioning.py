"""How a condition reaches the diffusion UNet: the seam between the LDM and its conditioner.

A :class:`Conditioning` turns a batch (labels, captions) into UNet keyword tensors for training
(with condition dropout for classifier-free guidance), and labels or prompts into the
conditional and null keyword tensors for guided sampling (Ho & Salimans 2022). Kinds:

- ``none``: unconditional; a condition at sampling is an error.
- ``class``: labels ``0..K-1``, null class ``K``. ``class_route``: ``time`` adds a label
  embedding of ``K + 1`` entries to the UNet's time embedding (``class_labels``);
  ``context`` cross-attends to a :class:`ClassEncoder`'s tokens (``context``, LDM sec. 3.3);
  ``both``. Always trained jointly with the UNet.
- ``text``: captions through a :class:`CaptionEncoder` to ``context [B, L, D]``. The null
  condition is the empty caption, so an empty prompt samples unconditionally. The encoder is
  loaded from a ``ConditionerModule`` checkpoint (``text_ckpt_path``; frozen unless
  ``freeze_text=false``), built from ``text`` and trained jointly, or a pretrained CLIP text
  encoder from ``transformers`` (``text_pretrained``: a hub id or a local folder; frozen
  unless ``freeze_text=false``), as Stable Diffusion conditions on CLIP ViT-L/14.

Training drops each item's condition to the null one with probability ``p_uncond``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from ldm_lightning.data.tokenizer import dataset_captions
from ldm_lightning.models.checkpoints import load_stage, stage_sha256
from ldm_lightning.models.conditioner import ConditionerModule
from ldm_lightning.nn.condition_encoders import CaptionEncoder, ClassEncoder, check_labels
from ldm_lightning.utils.cycling import cycle_to

KINDS = ("none", "class", "text")
CLASS_ROUTES = ("time", "context", "both")
TEXT_KEY = "model.conditioning.text_ckpt_path"
T = TypeVar("T")


def expand(items: Sequence[T] | Tensor, n: int, what: str) -> list[T] | Tensor:
    """``n`` conditions from ``items``: as given when ``len == n``, else each repeated
    ``n // len`` times in order (``[a, b]``, n=4 -> ``[a, a, b, b]``: one grid row each)."""
    count = len(items)
    if count == 0 or n % count:
        raise ValueError(
            f"got {count} {what} for n={n} samples; pass n {what}, or a number that divides n"
        )
    repeat = n // count
    if isinstance(items, Tensor):
        return items.repeat_interleave(repeat)
    return [item for item in items for _ in range(repeat)]


class Conditioning(nn.Module):
    """Condition -> UNet keyword tensors. See the module docstring.

    Args:
        kind: "none" | "class" | "text".
        p_uncond: probability of dropping a training condition to the null one.
        num_classes: K, the number of real classes (kind "class").
        class_route: "time" | "context" | "both" (kind "class").
        width: context width ``D`` of the class tokens, and of a text encoder built here.
        num_tokens: context tokens per class (class route "context"/"both").
        text: :class:`CaptionEncoder` arguments for a jointly trained text encoder.
        text_ckpt_path: a ``ConditionerModule`` checkpoint with a text encoder (a ``.ckpt`` or
            an export folder).
        text_pretrained: a ``transformers`` CLIP text model: hub id or local folder.
        freeze_text: freeze the text encoder; default: frozen iff loaded from a checkpoint
            or pretrained.
        text_hparams, text_sha256, text_pretrained_record: the record of a loaded text
            encoder (see :meth:`record`): with them the architecture is built without reading
            ``text_ckpt_path`` or the hub, and the weights come with the diffusion checkpoint.
        trust_checkpoint: read a ``text_ckpt_path`` whose pickle names code (see
            :mod:`ldm_lightning.utils.safe_load`); refused otherwise.
    """

    def __init__(
        self,
        kind: str = "none",
        p_uncond: float = 0.1,
        num_classes: int | None = None,
        class_route: str = "time",
        width: int = 128,
        num_tokens: int = 1,
        text: dict[str, Any] | None = None,
        text_ckpt_path: str | None = None,
        freeze_text: bool | None = None,
        text_hparams: dict[str, Any] | None = None,
        text_sha256: str | None = None,
        text_pretrained: str | None = None,
        text_pretrained_record: dict[str, Any] | None = None,
        trust_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"model.conditioning.kind={kind!r} is unknown; valid: {KINDS}")
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"model.conditioning.p_uncond={p_uncond} must be in [0, 1)")
        self.kind = kind
        self.p_uncond = p_uncond
        self._record: dict[str, Any] = {}
        self.frozen = False
        if kind == "class":
            self._build_class(num_classes, class_route, width, num_tokens)
        elif kind == "text" and (text_pretrained or text_pretrained_record):
            self._build_pretrained_text(text_pretrained, text_pretrained_record, text_ckpt_path,
                                        freeze_text)
        elif kind == "text":
            self._build_text(
                text or {},
                width,
                text_ckpt_path,
                freeze_text,
                text_hparams,
                text_sha256,
                trust_checkpoint,
            )

    def _build_class(
        self, num_classes: int | None, route: str, width: int, num_tokens: int
    ) -> None:
        if not num_classes or num_classes < 1:
            raise ValueError(
                "model.conditioning.kind=class needs model.conditioning.num_classes (the number "
                "of labels of the dataset, e.g. 18 for shapes)"
            )
        if route not in CLASS_ROUTES:
            raise ValueError(
                f"model.conditioning.class_route={route!r} is unknown; valid: {CLASS_ROUTES}"
            )
        self.num_classes = num_classes
        self.class_route = route
        self.classes = ClassEncoder(num_classes, width, num_tokens) if route != "time" else None

    def _build_text(
        self,
        text: dict[str, Any],
        width: int,
        ckpt_path: str | None,
        freeze: bool | None,
        hparams: dict[str, Any] | None,
        sha256: str | None,
        trust: bool,
    ) -> None:
        if hparams is not None:
            self.text = CaptionEncoder(**hparams)
            self._record = {"text_hparams": dict(hparams), "text_sha256": sha256}
        elif ckpt_path:
            module = load_stage(ConditionerModule, ckpt_path, "conditioner", TEXT_KEY, trust)
            if not isinstance(module.encoder, CaptionEncoder):
                raise ValueError(
                    f"{TEXT_KEY}={ckpt_path} holds a class conditioner, but kind=text needs a "
                    "text one; train it with `+experiment=shapes_clip`"
                )
            self.text = module.encoder
            self._record = {
                "text_hparams": dict(module.encoder.config),
                "text_sha256": stage_sha256(ckpt_path),
            }
        else:
            self.text = CaptionEncoder(**{"width": width, **text})
        from_checkpoint = hparams is not None or bool(ckpt_path)
        if freeze and not from_checkpoint:
            raise ValueError(
                "model.conditioning.freeze_text=true freezes a randomly initialised text "
                f"encoder; set {TEXT_KEY} to a pretrained conditioner or freeze_text=false"
            )
        self._freeze_text(from_checkpoint if freeze is None else freeze)

    def _build_pretrained_text(
        self,
        name_or_path: str | None,
        record: dict[str, Any] | None,
        ckpt_path: str | None,
        freeze: bool | None,
    ) -> None:
        from ldm_lightning.nn.pretrained_text import PretrainedTextEncoder

        if ckpt_path:
            raise ValueError(
                f"set either {TEXT_KEY} (our conditioner) or model.conditioning.text_pretrained "
                "(a transformers CLIP text model), not both"
            )
        if record is not None:
            self.text = PretrainedTextEncoder.from_record(record)
        else:
            self.text = PretrainedTextEncoder(name_or_path)
        self._record = {"text_pretrained_record": self.text.record()}
        self._freeze_text(True if freeze is None else freeze)

    def _freeze_text(self, frozen: bool) -> None:
        self.frozen = frozen
        if frozen:
            self.text.requires_grad_(False)
            self.text.eval()

    # ------------------------------------------------------------------ setup
    @property
    def is_conditional(self) -> bool:
        return self.kind != "none"

    def unet_kwargs(self) -> dict[str, Any]:
        """Constructor arguments the UNet needs for this conditioning (context_dim, num_classes)."""
        if self.kind == "text":
            return {"context_dim": self.text.width}
        if self.kind != "class":
            return {}
        kwargs: dict[str, Any] = {}
        if self.class_route in ("time", "both"):
            kwargs["num_classes"] = self.num_classes + 1
        if self.classes is not None:
            kwargs["context_dim"] = self.classes.width
        return kwargs

    def record(self) -> dict[str, Any]:
        """Config entries that rebuild a loaded text encoder without its checkpoint file."""
        return dict(self._record)

    def prepare(self, datamodule: pl.LightningDataModule) -> None:
        """Learn the tokenizer of a text encoder trained from scratch from the training captions.

        Call at the start of fit (the datamodule is set up); a no-op otherwise.
        """
        if (
            self.kind == "text"
            and isinstance(self.text, CaptionEncoder)  # a pretrained one brings its tokenizer
            and self.text.tokenizer is None
        ):
            self.text.fit_tokenizer(dataset_captions(datamodule.dataset("train")))

    def train(self, mode: bool = True) -> Conditioning:
        super().train(mode)
        if self.frozen:
            self.text.eval()
        return self

    # ------------------------------------------------------------------ encoding
    def _class_kwargs(self, labels: Tensor) -> dict[str, Tensor]:
        kwargs = {}
        if self.class_route in ("time", "both"):
            kwargs["class_labels"] = labels
        if self.classes is not None:
            device = self.classes.embedding.weight.device
            kwargs["context"] = self.classes(labels.to(device))[0]
        return kwargs

    def _text_kwargs(self, captions: list[str]) -> dict[str, Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return {"context": self.text(captions)[0]}

    def drop_mask(self, n: int) -> Tensor:
        """``[n]`` bool, each True with probability ``p_uncond`` (condition -> null)."""
        return torch.rand(n) < self.p_uncond

    def forward(self, batch: dict[str, Any], train: bool) -> dict[str, torch.Tensor]:
        """UNet keyword tensors for ``batch`` (training drops conditions at rate p_uncond)."""
        if self.kind == "class":
            labels = check_labels(batch["label"], self.num_classes)
            if train:
                drop = self.drop_mask(len(labels)).to(labels.device)
                labels = labels.masked_fill(drop, self.num_classes)
            return self._class_kwargs(labels)
        if self.kind == "text":
            captions = list(batch["caption"])
            if train:
                drop = self.drop_mask(len(captions)).tolist()
                captions = ["" if d else c for c, d in zip(captions, drop, strict=True)]
            return self._text_kwargs(captions)
        return {}

    # ------------------------------------------------------------------ sampling
    def for_sampling(
        self,
        n: int,
        labels: list[int] | torch.Tensor | None = None,
        prompts: list[str] | None = None,
        negative_prompts: list[str] | None = None,
        unconditional: bool = False,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(cond, uncond)`` keyword tensors for ``n`` samples.

        ``labels`` / ``prompts``: n of them, or a number that divides n (each repeated). The
        null condition (class K, empty caption, or ``negative_prompts``) is ``uncond``; with
        ``unconditional=True`` both are the null condition.
        """
        if self.kind == "none":
            if labels is not None or prompts is not None:
                raise ValueError(
                    "this model is unconditional (model.conditioning.kind=none); sample it "
                    "without labels or prompts"
                )
            return {}, {}
        given = labels if self.kind == "class" else prompts
        other = prompts if self.kind == "class" else labels
        if other is not None:
            wanted = "labels" if self.kind == "class" else "prompts"
            raise ValueError(
                f"this model is {self.kind}-conditional: pass {wanted}=[...], not "
                f"{'prompts' if self.kind == 'class' else 'labels'}"
            )
        if given is None and not unconditional:
            what = (
                f"labels=[...] in 0..{self.num_classes - 1}"
                if self.kind == "class"
                else "prompts=[...]"
            )
            raise ValueError(
                f"this model is {self.kind}-conditional: pass {what}, or unconditional=True "
                "to sample with the null condition"
            )
        if given is not None and unconditional:
            raise ValueError("pass either a condition or unconditional=True, not both")
        if self.kind == "class":
            if negative_prompts is not None:
                raise ValueError("negative prompts need a text-conditional model")
            null = torch.full((n,), self.num_classes, dtype=torch.long)
            uncond = self._class_kwargs(null)
            if unconditional:
                return uncond, uncond
            labels = expand(check_labels(given, self.num_classes), n, "labels")
            return self._class_kwargs(labels), uncond
        if unconditional and negative_prompts is not None:
            raise ValueError("negative prompts need prompts; unconditional=True has none")
        uncond = self._text_kwargs(expand(negative_prompts or [""], n, "negative prompts"))
        if unconditional:
            return uncond, uncond
        return self._text_kwargs(expand(list(given), n, "prompts")), uncond

    def sampling_inputs(self, batch: dict[str, Any], n: int) -> dict[str, Any]:
        """Labels/prompts to draw validation samples with (the batch's, cycled to ``n``)."""
        if self.kind == "class":
            return {"labels": cycle_to(torch.as_tensor(batch["label"]).tolist(), n)}
        if self.kind == "text":
            return {"prompts": cycle_to(batch["caption"], n)}
        return {}
