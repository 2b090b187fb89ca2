"""The symmetric contrastive loss of CLIP (Radford et al. 2021, sec. 2.3 and Fig. 3).

Embeddings are L2-normalised, ``logits = s * I T^T`` with the inverse temperature ``s``, and
the loss is the mean of the cross-entropies over images (rows) and over captions (columns).
Items of a batch that share a caption (or label) are all positives, with equal target mass;
with unique captions this is CLIP's loss exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
