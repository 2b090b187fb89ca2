"""Transformer text encoder ``tau_theta(y)`` for cross-attention conditioning (LDM sec. 3.3).

Token ids ``[B, L]`` -> token + learned positional embeddings -> ``layers`` pre-norm
transformer blocks (``x + MHA(LN(x))``, ``x + MLP(LN(x))``; GPT-2 / CLIP text tower) -> a final
LayerNorm. The output is the context ``[B, L, D]`` the UNet cross-attends to, and a pooled
vector ``[B, D]``: the output at the end-of-text token, as in CLIP (Radford et al. 2021, sec.
2.4). Attention is bidirectional with padding masked out as keys, so the real tokens' outputs
do not depend on how much padding follows; the end token sees the whole caption.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm_lightning.utils.device import on_host


class SelfAttention(nn.Module):
    """Multi-head self-attention ``softmax(Q K^T / sqrt(d) + mask) V`` over ``[B, L, D]``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"text width {width} is not divisible by heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        """``x`` [B, L, D], ``key_mask`` [B, L] bool (True: attend to) -> [B, L, D]."""
        b, length, width = x.shape
        q, k, v = (
            t.reshape(b, length, self.heads, -1).transpose(1, 2)
            for t in self.qkv(x).chunk(3, dim=-1)
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        return self.out(out.transpose(1, 2).reshape(b, length, width))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))`` with a GELU MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        x = x + self.dropout(self.attn(self.ln_1(x), key_mask))
        return x + self.dropout(self.mlp(self.ln_2(x)))


class TextEncoder(nn.Module):
    """Token ids ``[B, L]`` -> ``(context [B, L, width], pooled [B, width])``.

    Args:
        vocab_size: rows of the token embedding (at least the tokenizer's vocabulary).
        context_length: the longest sequence ``L`` (rows of the positional embedding).
        width: model width ``D`` (= the UNet's ``context_dim``).
        layers, heads, mlp_ratio, dropout: transformer size.
        pad_id: the padding token, masked out as an attention key.
        eos_id: the end-of-text token whose output is the pooled vector.

    ``config`` holds the architecture's arguments (all but the two token ids).
    """

    def __init__(
        self,
        vocab_size: int,
        context_length: int = 32,
        width: int = 128,
        layers: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        pad_id: int = 0,
        eos_id: int = 2,
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
        self.context_length = context_length
        self.width = width
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.blocks = nn.ModuleList(
            TransformerBlock(width, heads, mlp_ratio, dropout) for _ in range(layers)
        )
        self.ln_final = nn.LayerNorm(width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """``tokens`` [B, L] long, L <= context_length, one ``eos_id`` per row.

        Returns the context [B, L, D] and the pooled vector [B, D] (output at the first
        ``eos_id`` of each row). A row without one is refused on the host
        (:func:`~ldm_lightning.utils.device.on_host`).
        """
        if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(
                f"tokens must be [B, L] with L <= {self.context_length}, got "
                f"{tuple(tokens.shape)}"
            )
        is_eos = tokens == self.eos_id
        if on_host(tokens) and not bool(is_eos.any(dim=1).all()):
            raise ValueError(f"every token row needs an end-of-text token (id {self.eos_id})")
        key_mask = tokens != self.pad_id
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x, key_mask)
        x = self.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), is_eos.int().argmax(dim=1)]
        return x, pooled
