"""Attention layers of the diffusion UNet: cross-attention transformer and pixel self-attention.

Parameter names follow CompVis ``ldm/modules/attention.py`` (``SpatialTransformer``) and
``openaimodel.py`` (``AttentionBlock``), so their checkpoints load by name. The shared
building blocks of the UNet (float32 GroupNorm, zero initialisation, gradient checkpointing)
live here too because both this module and ``unet.py`` use them.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back: bf16/fp16 activations keep exact statistics."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int, eps: float = 1e-5) -> GroupNorm32:
    """GroupNorm (Wu & He 2018) with ``gcd(32, channels)`` groups.

    That is 32 groups for the multiples of 32 that real models (and CompVis checkpoints) use,
    and fewer for the small or odd widths of test models, e.g. after a skip concatenation.
    """
    return GroupNorm32(math.gcd(32, channels), channels, eps=eps)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters of ``module``, so a residual branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def maybe_checkpoint(fn: Callable[..., Tensor], *args: Tensor | None, enabled: bool) -> Tensor:
    """``fn(*args)``; when ``enabled`` and grad is on, recompute activations in backward.

    Gradient checkpointing (Chen et al. 2016) trades one extra forward for not storing the
    block's activations. The non-reentrant variant restores the RNG state, so dropout masks
    and therefore gradients are identical to the plain computation.
    """
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class CrossAttention(nn.Module):
    """Multi-head (cross-)attention over token sequences.

    LDM eq. 3: ``Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V`` with ``Q = W_Q x``,
    ``K = W_K c``, ``V = W_V c``, per head of width ``d = dim_head``; the context ``c`` is the
    conditioner output ``tau_theta(y)``, or ``x`` itself (self-attention) when not given.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.context_dim = query_dim if context_dim is None else context_dim
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(self.context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(self.context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``x`` [B, N, query_dim] to ``context`` [B, L, context_dim] -> [B, N, query_dim]."""
        context = x if context is None else context
        if context.shape[-1] != self.context_dim:
            raise ValueError(
                f"context has width {context.shape[-1]} but this attention expects "
                f"{self.context_dim}; match the conditioner's output dim to context_dim"
            )
        q, k, v = (
            self._split_heads(t) for t in (self.to_q(x), self.to_k(context), self.to_v(context))
        )
        out = F.scaled_dot_product_attention(q, k, v)
        b, h, n, d = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, h * d))

    def _split_heads(self, t: Tensor) -> Tensor:
        """[B, N, heads * d] -> [B, heads, N, d]."""
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, -1).transpose(1, 2)


class GEGLU(nn.Module):
    """Gated GELU unit (Shazeer 2020, "GLU Variants"): ``a * GELU(g)`` with ``[a, g] = W x + b``."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        """[..., dim_in] -> [..., dim_out]."""
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP ``W_2 act(W_1 x)``, hidden width ``mult * dim``; gated (GEGLU) by default."""

    def __init__(
        self,
        dim: int,
        dim_out: int | None = None,
        mult: int = 4,
        glu: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner_dim = int(dim * mult)
        project_in = (
            GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        )
        self.net = nn.Sequential(
            project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out or dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        """[..., dim] -> [..., dim_out]."""
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention, feed-forward, each residual.

    ``x += attn1(norm1(x)); x += attn2(norm2(x), c); x += ff(norm3(x))`` (LDM sec. 3.3). Without
    ``context_dim``, ``attn2`` attends over ``x`` as a second self-attention.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        gated_ff: bool = True,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(
            dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout
        )
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.use_checkpoint = use_checkpoint

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``x`` [B, N, dim], ``context`` [B, L, context_dim] or None -> [B, N, dim]."""
        return maybe_checkpoint(
            self._forward, x, context, enabled=self.use_checkpoint and self.training
        )

    def _forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned by cross-attention (LDM sec. 3.3).

    ``h = proj_in(norm(x))`` is flattened to ``[B, H*W, inner]`` tokens, passed through ``depth``
    transformer blocks, reshaped and projected back; ``proj_out`` starts at zero, so the block
    starts as the identity ``x + 0``.
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | None = None,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        inner_dim = n_heads * d_head
        self.norm = normalization(in_channels, eps=1e-6)
        self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim,
                n_heads,
                d_head,
                dropout=dropout,
                context_dim=context_dim,
                use_checkpoint=use_checkpoint,
            )
            for _ in range(depth)
        )
        self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``x`` [B, C, H, W], ``context`` [B, L, context_dim] or None -> [B, C, H, W]."""
        b, _, h, w = x.shape
        tokens = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return x + self.proj_out(tokens.transpose(1, 2).reshape(b, -1, h, w))


class AttentionBlock(nn.Module):
    """Self-attention over pixels, as in DDPM's UNet (Ho et al. 2020, App. B) and openai's ADM.

    ``x + proj_out(Attention(qkv(norm(x))))`` with ``proj_out`` zero-initialised. The fused
    ``qkv`` projection lays out its ``3 * C`` output channels head by head (``[q_h, k_h, v_h]``
    for each head ``h``), the "legacy" order of openai/CompVis, so their weights load unchanged.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if num_head_channels != -1:
            if channels % num_head_channels:
                raise ValueError(
                    f"channels {channels} not divisible by num_head_channels {num_head_channels}"
                )
            num_heads = channels // num_head_channels
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"channels {channels} not divisible into num_heads {num_heads}")
        self.num_heads = num_heads
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, kernel_size=1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, kernel_size=1))

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C, H, W]."""
        return maybe_checkpoint(self._forward, x, enabled=self.use_checkpoint and self.training)

    def _forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x.reshape(b, c, h * w)).transpose(1, 2)
        # The 1x1 convolutions run as matmuls over [B, H*W, C] tokens: CPU conv1d takes a slow
        # path, and q, k, v come out contiguous per head, as SDPA's fused kernels require.
        qkv = F.linear(tokens, self.qkv.weight.squeeze(-1), self.qkv.bias)
        q, k, v = qkv.reshape(b, h * w, self.num_heads, -1).transpose(1, 2).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        out = F.linear(out, self.proj_out.weight.squeeze(-1), self.proj_out.bias)
        return x + out.transpose(1, 2).reshape(b, c, h, w)
