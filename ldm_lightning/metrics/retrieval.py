"""Retrieval recall@k of paired image and caption embeddings (CLIP-style evaluation)."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch
from torch import Tensor


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


def recall_over_distinct(
    image: Tensor, text: Tensor, keys: Sequence[Hashable], ks: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    """:func:`retrieval_recall` of N pairs ``image``, ``text`` ``[N, E]`` whose conditions are
    ``keys`` (captions or labels): retrieved among the distinct keys, each represented by the
    text embedding of its first item."""
    first: dict[Hashable, int] = {}
    for index, key in enumerate(keys):
        first.setdefault(key, index)
    column = {key: j for j, key in enumerate(first)}
    match = torch.tensor([column[key] for key in keys])
    return retrieval_recall(image, text[list(first.values())], match, ks)
