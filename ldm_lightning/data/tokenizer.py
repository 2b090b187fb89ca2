"""Caption tokenizer: byte-level BPE learned from a dataset's captions (``tokenizers`` library).

Why byte-level BPE (the scheme of GPT-2 and CLIP) learned from our own captions: every string
encodes, with no unknown token, because the base alphabet is the 256 bytes, so a user's prompt
with an unseen word still reaches the text encoder as bytes; the merges learned from the
captions make each caption word one token, so the vocabulary stays tiny (a few hundred entries
for shapes) and fits the small text encoder. The tokenizer is a JSON string stored inside the
checkpoint, so a checkpoint alone is enough to sample and nothing is downloaded.

Text is normalised (NFKC, lower case, runs of white space to one space, stripped) before
encoding; ``decode(encode(s)) == normalize(s)`` for every string ``s`` that fits the context.
A sequence is ``<bos> tokens <eos> <pad> ...``, always ``context_length`` long. A longer
caption is truncated to ``context_length - 2`` tokens (keeping ``<eos>``) with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
SPECIAL_TOKENS = (PAD, BOS, EOS)
# Byte alphabet plus the special tokens: the smallest vocabulary that encodes every string.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def _normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Strip(),
        ]
    )


class CaptionTokenizer:
    """Captions -> token ids ``[B, context_length]`` and back. See the module docstring."""

    def __init__(self, tokenizer: Tokenizer, context_length: int) -> None:
        if context_length < 3:
            raise ValueError(
                f"context_length={context_length} leaves no room for a token between <bos> and "
                "<eos>; use at least 3"
            )
        ids = [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
        if ids != [PAD_ID, BOS_ID, EOS_ID]:
            raise ValueError(
                f"the tokenizer's special tokens {SPECIAL_TOKENS} have ids {ids}, expected "
                f"{[PAD_ID, BOS_ID, EOS_ID]}; build it with CaptionTokenizer.train"
            )
        self.tokenizer = tokenizer
        self.context_length = context_length

    @classmethod
    def train(
        cls, captions: Iterable[str], vocab_size: int, context_length: int
    ) -> CaptionTokenizer:
        """Learn byte-level BPE merges from ``captions`` up to ``vocab_size`` entries."""
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size={vocab_size} is below the byte alphabet plus special tokens "
                f"({MIN_VOCAB_SIZE}); use at least {MIN_VOCAB_SIZE}"
            )
        tokenizer = Tokenizer(models.BPE())
        tokenizer.normalizer = _normalizer()
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(captions, trainer)
        return cls(tokenizer, context_length)

    @classmethod
    def from_json(cls, text: str, context_length: int) -> CaptionTokenizer:
        return cls(Tokenizer.from_str(text), context_length)

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    def __getstate__(self) -> dict[str, Any]:
        return {"json": self.to_json(), "context_length": self.context_length}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(Tokenizer.from_str(state["json"]), state["context_length"])

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def normalize(self, text: str) -> str:
        return self.tokenizer.normalizer.normalize_str(text)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids ``[B, context_length]`` (long): ``<bos> ... <eos>`` then ``<pad>``.

        An empty (or all white space) caption is ``<bos> <eos>``: the null caption of
        classifier-free guidance. Longer captions are truncated with a warning.
        """
        if isinstance(texts, str):
            raise TypeError("encode takes a list of captions, not one string; wrap it in [...]")
        room = self.context_length - 2
        ids = torch.full((len(texts), self.context_length), PAD_ID, dtype=torch.long)
        truncated = []
        for row, encoding in enumerate(self.tokenizer.encode_batch(list(texts))):
            tokens = encoding.ids
            if len(tokens) > room:
                truncated.append(texts[row])
                tokens = tokens[:room]
            ids[row, : len(tokens) + 2] = torch.tensor([BOS_ID, *tokens, EOS_ID])
        if truncated:
            warnings.warn(
                f"{len(truncated)} caption(s) are longer than the context length of "
                f"{self.context_length} tokens and were truncated (e.g. {truncated[0]!r}); "
                "shorten them or train a conditioner with a larger text.context_length",
                UserWarning,
                stacklevel=2,
            )
        return ids

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """The normalised text of one id sequence ``[L]``; special tokens are dropped."""
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.tokenizer.decode(values, skip_special_tokens=True).strip()
