"""A pretrained CLIP text encoder from ``transformers``, behind the caption-encoder interface.

``captions list[str] -> (context [B, L, D], pooled [B, D])``, as :class:`CaptionEncoder`:
``context`` is the final (layer-normed) hidden states of every token, the tensor Stable
Diffusion's UNet cross-attends to; ``pooled`` is the hidden state at the end-of-text token
(CLIP's ``pooler_output``). Loaded from the hub (``openai/clip-vit-large-patch14``) or a local
folder written by ``save_pretrained``; the tokenizer comes from the same place.

The weights live in this module, so a diffusion checkpoint that holds it carries them; the
architecture (``CLIPTextConfig``) and the tokenizer's files travel as extra state. A checkpoint
therefore rebuilds with :meth:`PretrainedTextEncoder.from_record` without network access.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

from torch import Tensor, nn

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "a pretrained CLIP text encoder needs the `transformers` package: "
    "pip install 'ldm-lightning[clip]' (or pip install transformers)"
)


def _transformers():
    try:
        import transformers
    except ImportError as error:  # pragma: no cover - exercised only without transformers
        raise ImportError(INSTALL_HINT) from error
    return transformers


def _tokenizer_files(tokenizer: Any) -> dict[str, str]:
    """The tokenizer as ``{file name: text}``, what ``save_pretrained`` writes."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return {p.name: p.read_text() for p in Path(folder).iterdir() if p.is_file()}


def _tokenizer_from_files(files: dict[str, str]) -> Any:
    with tempfile.TemporaryDirectory() as folder:
        for name, text in files.items():
            (Path(folder) / name).write_text(text)
        return _transformers().AutoTokenizer.from_pretrained(folder)


class PretrainedTextEncoder(nn.Module):
    """A ``transformers`` CLIP text model and its tokenizer; see the module docstring.

    Args:
        name_or_path: a hub id or a local ``save_pretrained`` folder (ignored with ``config``).
        config: a ``CLIPTextConfig`` as a dict: build the architecture only (random weights,
            no tokenizer); the weights and tokenizer then come from a state dict.
        context_length: tokens per caption; default the model's ``max_position_embeddings``
            (77 for OpenAI's CLIP). Longer captions are truncated with a warning.
    """

    def __init__(
        self,
        name_or_path: str | None = None,
        config: dict[str, Any] | None = None,
        context_length: int | None = None,
    ) -> None:
        super().__init__()
        transformers = _transformers()
        self.tokenizer: Any = None
        if config is not None:
            self.model = transformers.CLIPTextModel(transformers.CLIPTextConfig.from_dict(config))
        elif name_or_path:
            self.model = self._load(transformers, name_or_path)
        else:
            raise ValueError("PretrainedTextEncoder needs name_or_path or config")
        self.name_or_path = name_or_path
        self.width = int(self.model.config.hidden_size)
        self.context_length = int(context_length or self.model.config.max_position_embeddings)
        if self.context_length > self.model.config.max_position_embeddings:
            raise ValueError(
                f"context_length={self.context_length} exceeds the model's "
                f"{self.model.config.max_position_embeddings} positions"
            )

    def _load(self, transformers: Any, name_or_path: str) -> nn.Module:
        try:
            model = transformers.CLIPTextModel.from_pretrained(name_or_path)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
        except OSError as error:
            raise OSError(
                f"could not load a CLIP text encoder from {name_or_path!r}: {error}\n"
                "Give a local folder written by CLIPTextModel.save_pretrained and "
                "tokenizer.save_pretrained, or a hub id (e.g. openai/clip-vit-large-patch14) "
                "on a machine with network access (its files are cached in ~/.cache/huggingface)."
            ) from error
        log.info("Loaded the pretrained text encoder %s (%d-wide)", name_or_path,
                 model.config.hidden_size)
        return model

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> PretrainedTextEncoder:
        """The architecture of :meth:`record`; load a state dict for the weights and tokenizer."""
        module = cls(config=record["config"], context_length=record["context_length"])
        module.name_or_path = record.get("name_or_path")  # where it came from, recorded again
        return module

    def record(self) -> dict[str, Any]:
        """What rebuilds this module without the hub: its config and context length."""
        return {"config": self.model.config.to_dict(), "context_length": self.context_length,
                "name_or_path": self.name_or_path}

    def get_extra_state(self) -> dict[str, Any]:
        files = None if self.tokenizer is None else _tokenizer_files(self.tokenizer)
        return {"tokenizer_files": files}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        files = state.get("tokenizer_files")
        self.tokenizer = None if files is None else _tokenizer_from_files(files)

    def tokenize(self, captions: list[str]) -> Tensor:
        """Token ids ``[B, context_length]``: BOS, tokens, EOS, then padding (truncated with a
        warning when too long)."""
        if self.tokenizer is None:
            raise RuntimeError("this pretrained text encoder has no tokenizer loaded")
        lengths = [len(ids) for ids in self.tokenizer(captions, truncation=False)["input_ids"]]
        too_long = [c for c, n in zip(captions, lengths, strict=True) if n > self.context_length]
        if too_long:
            warnings.warn(
                f"{len(too_long)} prompt(s) longer than the context length "
                f"({self.context_length} tokens) were truncated, e.g. {too_long[0][:80]!r}",
                stacklevel=3,
            )
        return self.tokenizer(
            captions, padding="max_length", max_length=self.context_length, truncation=True,
            return_tensors="pt",
        )["input_ids"]

    def forward(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        ids = self.tokenize(list(captions)).to(self.model.device)
        out = self.model(input_ids=ids)
        return out.last_hidden_state, out.pooler_output
