"""Condition encoders ``tau_theta(y)`` (LDM sec. 3.3): condition -> context tokens, pooled vector.

Both share one interface, ``encoder(condition) -> (context [B, L, D], pooled [B, D])``:

- :class:`ClassEncoder`: a learned embedding of ``num_classes + 1`` entries (the last is the
  null class of classifier-free guidance), ``num_tokens`` context tokens per class.
- :class:`CaptionEncoder`: the caption tokenizer (learned from the training captions and kept
  in the state dict) and a transformer :class:`~ldm_lightning.nn.text_encoder.TextEncoder`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from ldm_lightning.data.tokenizer import EOS_ID, PAD_ID, CaptionTokenizer
from ldm_lightning.nn.text_encoder import TextEncoder
from ldm_lightning.utils.device import on_host

log = logging.getLogger(__name__)


def check_labels(labels: Tensor | list[int], num_classes: int) -> Tensor:
    """``labels`` as a long tensor, or a ValueError naming the valid range ``0..K-1`` (checked
    on the host only: :func:`~ldm_lightning.utils.device.on_host`)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if not on_host(labels):
        return labels
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
        if not num_classes or num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        self.null_index = num_classes
        self.width = width
        self.num_tokens = num_tokens
        self.embedding = nn.Embedding(num_classes + 1, num_tokens * width)

    def forward(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``labels`` [B] long -> (context [B, num_tokens, width], pooled [B, width])."""
        context = self.embedding(labels.to(self.embedding.weight.device))
        context = context.view(-1, self.num_tokens, self.width)
        return context, context.mean(dim=1)


class CaptionEncoder(nn.Module):
    """Captions ``list[str]`` -> (context [B, context_length, width], pooled [B, width]).

    Args:
        vocab_size: the tokenizer's vocabulary (byte alphabet + learned merges).
        transformer: the other :class:`TextEncoder` arguments (``context_length``, ``width``,
            ``layers``, ``heads``, ``mlp_ratio``, ``dropout``).

    The tokenizer is not a parameter: it is learned by :meth:`fit_tokenizer` and travels in
    the state dict as extra state (its JSON), so every checkpoint holding this module can
    tokenize. ``config`` rebuilds the architecture (the weights and tokenizer then load).
    """

    def __init__(self, vocab_size: int = 512, **transformer: Any) -> None:
        super().__init__()
        self.transformer = TextEncoder(vocab_size, pad_id=PAD_ID, eos_id=EOS_ID, **transformer)
        self.config = self.transformer.config
        self.width = self.transformer.width
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
