"""Captions through a text encoder to the context ``[B, L, D]`` the UNet cross-attends to.

:class:`CaptionConditioning` is what every text encoder shares: the null condition is the
empty caption (so an empty prompt samples unconditionally), negative prompts replace it, and
a frozen encoder stays in eval mode and builds no graph. :class:`TextConditioning` uses our
:class:`~ldm_lightning.nn.condition_encoders.CaptionEncoder`: loaded from a
``ConditionerModule`` checkpoint or export folder (``text_ckpt_path``; frozen unless
``freeze_text=false``), or built from ``text`` and trained jointly with the UNet (its tokenizer
learned from the training captions at the start of fit).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ldm_lightning.data.interface import DataSource
from ldm_lightning.models.checkpoints import load_stage, stage_sha256
from ldm_lightning.models.conditioner import ConditionerModule
from ldm_lightning.models.conditioning.base import Conditioning, expand
from ldm_lightning.models.handshake import training_captions
from ldm_lightning.nn.condition_encoders import CaptionEncoder

TEXT_KEY = "model.conditioning.text_ckpt_path"


class CaptionConditioning(Conditioning):
    """Captions -> ``context`` through ``self.text`` (``captions -> (context, pooled)``).

    Subclasses build ``self.text`` and then call :meth:`freeze_text`.
    """

    condition = "text"
    batch_key = "caption"
    inputs = "prompts"
    text: nn.Module
    frozen = False

    def freeze_text(self, frozen: bool) -> None:
        """Freeze the text encoder (no gradients, eval mode whatever the LDM's mode)."""
        self.frozen = frozen
        if frozen:
            self.text.requires_grad_(False)
            self.text.eval()

    def train(self, mode: bool = True) -> CaptionConditioning:
        super().train(mode)
        if self.frozen:
            self.text.eval()
        return self

    def unet_kwargs(self) -> dict[str, int]:
        return {"context_dim": self.text.width}

    def check(self, conditions: list[str]) -> list[str]:
        return list(conditions)

    def drop(self, conditions: list[str], mask: Tensor) -> list[str]:
        return ["" if d else c for c, d in zip(conditions, mask.tolist(), strict=True)]

    def null(self, n: int, negative_prompts: list[str] | None, unconditional: bool) -> list[str]:
        if unconditional and negative_prompts is not None:
            raise ValueError("negative prompts need prompts; unconditional=True has none")
        return expand(negative_prompts or [""], n, "negative prompts")

    def encode(self, conditions: list[str]) -> dict[str, Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return {"context": self.text(conditions)[0]}


class TextConditioning(CaptionConditioning):
    """Our caption encoder, pretrained CLIP-style or trained jointly. See the module docstring.

    Args:
        p_uncond: probability of dropping a training caption to the empty one.
        width: context width ``D`` of an encoder built here.
        text: :class:`CaptionEncoder` arguments for an encoder built here (vocab_size,
            context_length, layers, heads, mlp_ratio, dropout).
        text_ckpt_path: a ``ConditionerModule`` checkpoint with a text encoder (a ``.ckpt`` or
            an export folder).
        freeze_text: freeze the encoder; default: frozen iff loaded from a checkpoint.
        text_hparams, text_sha256: the record of a loaded encoder (see :meth:`record`): with
            them the architecture is built without reading ``text_ckpt_path``, and the weights
            come with the diffusion checkpoint.
        trust_checkpoint: read a ``text_ckpt_path`` whose pickle names code (see
            :mod:`ldm_lightning.utils.safe_load`); refused otherwise.
    """

    kind = "text"

    def __init__(
        self,
        p_uncond: float = 0.1,
        width: int = 128,
        text: dict[str, Any] | None = None,
        text_ckpt_path: str | None = None,
        freeze_text: bool | None = None,
        text_hparams: dict[str, Any] | None = None,
        text_sha256: str | None = None,
        trust_checkpoint: bool = False,
    ) -> None:
        super().__init__(p_uncond)
        self._record: dict[str, Any] = {}
        if text_hparams is not None:
            self.text = CaptionEncoder(**text_hparams)
            self._record = {"text_hparams": dict(text_hparams), "text_sha256": text_sha256}
        elif text_ckpt_path:
            self.text = load_caption_encoder(text_ckpt_path, trust_checkpoint)
            self._record = {
                "text_hparams": dict(self.text.config),
                "text_sha256": stage_sha256(text_ckpt_path),
            }
        else:
            self.text = CaptionEncoder(**{"width": width, **(text or {})})
        loaded = bool(self._record)
        if freeze_text and not loaded:
            raise ValueError(
                "model.conditioning.freeze_text=true freezes a randomly initialised text "
                f"encoder; set {TEXT_KEY} to a pretrained conditioner or freeze_text=false"
            )
        self.freeze_text(loaded if freeze_text is None else freeze_text)

    def record(self) -> dict[str, Any]:
        return dict(self._record)

    def prepare(self, data: DataSource | None) -> None:
        """Learn the tokenizer of an encoder trained from scratch from the training captions."""
        if self.text.tokenizer is None:
            self.text.fit_tokenizer(training_captions(data))


def load_caption_encoder(path: str, trust: bool = False) -> CaptionEncoder:
    """The caption encoder of the text ``ConditionerModule`` checkpoint (or export) at ``path``."""
    module = load_stage(ConditionerModule, path, "conditioner", TEXT_KEY, trust)
    if not isinstance(module.encoder, CaptionEncoder):
        raise ValueError(
            f"{TEXT_KEY}={path} holds a class conditioner, but text conditioning needs a text "
            "one; train it with `+experiment=shapes_clip`"
        )
    return module.encoder
