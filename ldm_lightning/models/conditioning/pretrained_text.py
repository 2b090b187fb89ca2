"""A pretrained CLIP text encoder from ``transformers`` (Stable Diffusion conditions on CLIP
ViT-L/14): captions to its final hidden states, the context the UNet cross-attends to."""

from __future__ import annotations

from typing import Any

from ldm_lightning.models.conditioning.text import CaptionConditioning
from ldm_lightning.nn.pretrained_text import PretrainedTextEncoder


class PretrainedTextConditioning(CaptionConditioning):
    """A :class:`~ldm_lightning.nn.pretrained_text.PretrainedTextEncoder`, frozen by default.

    Args:
        text_pretrained: a hub id (``openai/clip-vit-large-patch14``) or a local
            ``save_pretrained`` folder.
        freeze_text: freeze the encoder (default).
        text_pretrained_record: the record of a loaded encoder (see :meth:`record`): with it the
            architecture is built without the hub or the folder, and the weights and tokenizer
            come with the diffusion checkpoint.
        p_uncond: probability of dropping a training caption to the empty one.
    """

    kind = "pretrained_text"

    def __init__(
        self,
        text_pretrained: str | None = None,
        freeze_text: bool | None = True,
        text_pretrained_record: dict[str, Any] | None = None,
        p_uncond: float = 0.1,
    ) -> None:
        super().__init__(p_uncond)
        if text_pretrained_record is not None:
            self.text = PretrainedTextEncoder.from_record(text_pretrained_record)
        elif text_pretrained:
            self.text = PretrainedTextEncoder(text_pretrained)
        else:
            raise ValueError(
                "model/conditioning=pretrained_text needs model.conditioning.text_pretrained: a "
                "hub id (openai/clip-vit-large-patch14) or a save_pretrained folder"
            )
        self.freeze_text(True if freeze_text is None else freeze_text)

    def record(self) -> dict[str, Any]:
        return {"text_pretrained_record": self.text.record()}
