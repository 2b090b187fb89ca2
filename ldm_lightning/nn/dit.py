"""Diffusion Transformer ``eps_theta(z_t, t, c, y)`` (Peebles & Xie 2023, "Scalable diffusion
models with transformers"), a backbone in place of the UNet.

The latent is cut into ``p x p`` patches, each a token (sec. 3.2 "Patchify", Fig. 4); ``depth``
transformer blocks condition on ``c = t_emb + y_emb`` through adaLN-Zero (sec. 3.2, "DiT block
design", Fig. 3), and a linear decoder turns every token back into its patch (sec. 3.2
"Transformer decoder"). Text (or class-token) conditioning adds a cross-attention sub-block to
the context after the self-attention, as PixArt-alpha (Chen et al. 2023, sec. 2.3); the paper's
own cross-attention variant attends to ``[t_emb, y_emb]`` instead. Learned variances (the paper's
``2C`` output channels) are not predicted: the output has the input's shape.

Module and parameter names follow facebookresearch/DiT ``models.py`` (``x_embedder``,
``t_embedder``, ``y_embedder``, ``blocks.N.adaLN_modulation``, ``final_layer``), and so does
the initialisation. The model satisfies :mod:`ldm_lightning.nn.backbone`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm_lightning.nn.attention import CrossAttention, maybe_checkpoint
from ldm_lightning.nn.backbone import check_inputs
from ldm_lightning.nn.embeddings import timestep_embedding

PATCH_SIZES = (1, 2, 4, 8)
POS_EMBEDS = ("sincos", "learned")
# Table 1 of the paper: (hidden_size, depth, num_heads) of DiT-S, B, L and XL.
SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """Adaptive layer norm's affine step ``x * (1 + scale) + shift`` for tokens ``x`` [B, N, D]
    and per-sample ``shift``, ``scale`` [B, D] (sec. 3.2, adaLN)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """``[sin(pos w_0..w_{k-1}), cos(pos w_0..w_{k-1})]`` with ``k = dim / 2`` and
    ``w_i = 10000 ** (-i / k)`` (Vaswani et al. 2017, sec. 3.5, sines first as MAE and DiT).

    ``positions`` [M] -> [M, dim] float32.
    """
    k = dim // 2
    omega = 10000.0 ** -(torch.arange(k, dtype=torch.float64, device=positions.device) / k)
    angles = positions.double()[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d(dim: int, grid_size: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding of a ``grid_size x grid_size`` token grid, the
    ViT/MAE frequencies that DiT uses (sec. 3.2, "Patchify"): the first ``dim / 2`` channels
    encode the column ``j`` and the last ``dim / 2`` the row ``i`` (:func:`sincos_1d` each),
    tokens in row-major order ``i * grid_size + j``. Returns [grid_size**2, dim] float32, on
    the CPU (computed in float64, as DiT's numpy code).
    """
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    index = torch.arange(grid_size, device="cpu")
    rows, cols = torch.meshgrid(index, index, indexing="ij")
    return torch.cat(
        [sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1
    )


class PatchEmbed(nn.Module):
    """Patchify (sec. 3.2, Fig. 4): a ``p x p`` convolution of stride ``p``, i.e. one linear
    map per non-overlapping patch, to tokens in row-major order."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, (H / p) * (W / p), D]."""
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """``t -> MLP(timestep_embedding(t))``: 256 sinusoidal frequencies, then
    Linear-SiLU-Linear to the width ``D`` (sec. 3.2, "DiT block design")."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: Tensor) -> Tensor:
        """[B] (int or float) -> [B, D]."""
        frequencies = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(frequencies.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """A learned vector per class label, the null class for classifier-free guidance included
    (``num_classes`` counts it; the conditioning drops labels to it, not this module)."""

    def __init__(self, num_classes: int, hidden_size: int) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes, hidden_size)

    def forward(self, labels: Tensor) -> Tensor:
        """[B] long -> [B, D]."""
        return self.embedding_table(labels)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused, biased ``qkv`` projection (ViT; timm's
    ``Attention`` as DiT uses it), ``softmax(Q K^T / sqrt(d)) V`` by
    ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """[B, N, D] -> [B, N, D]."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """``fc2(GELU_tanh(fc1(x)))`` with hidden width ``mlp_ratio * D`` (DiT's MLP)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """[..., D] -> [..., D]."""
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (sec. 3.2, Fig. 3 right).

    From ``c`` [B, D] one linear layer regresses shift, scale and gate for each sub-block::

        x = x + gate_msa * Attn(norm1(x) * (1 + scale_msa) + shift_msa)
        x = x + CrossAttn(norm_cross(x), context)          (with context_dim only)
        x = x + gate_mlp * MLP(norm2(x) * (1 + scale_mlp) + shift_mlp)

    The modulation layer starts at zero, so every gate is 0 and the block is the identity at
    initialisation (the "-Zero"); the cross-attention's output projection starts at zero for
    the same reason (PixArt-alpha's initialisation). The norms have no affine parameters of
    their own: adaLN supplies them.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        context_dim: int | None = None,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads)
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
            self.cross_attn = CrossAttention(
                hidden_size, context_dim, heads=num_heads, dim_head=hidden_size // num_heads
            )
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor, context: Tensor | None = None) -> Tensor:
        """Tokens ``x`` [B, N, D], conditioning ``c`` [B, D], ``context`` [B, L, context_dim]
        (iff built with ``context_dim``) -> [B, N, D]."""
        return maybe_checkpoint(
            self._forward, x, c, context, enabled=self.use_checkpoint and self.training
        )

    def _forward(self, x: Tensor, c: Tensor, context: Tensor | None) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c).chunk(6, dim=1)
        )
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if context is not None:
            x = x + self.cross_attn(self.norm_cross(x), context)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN (shift, scale from ``c``) then a linear decoder of each token to its ``p x p x C``
    patch (sec. 3.2, "Transformer decoder"); modulation and decoder start at zero."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """[B, N, D], [B, D] -> [B, N, p * p * C]."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion Transformer (Peebles & Xie 2023, Fig. 3; see the module docstring).

    ``x`` [B, C, I, I] is patchified by a ``p x p`` convolution of stride ``p`` to
    ``T = (I / p)^2`` tokens of width ``D`` plus a position embedding, run through ``depth``
    adaLN-Zero blocks conditioned on ``c = t_emb + y_emb``, decoded per token and unpatchified
    to [B, out_channels, I, I]. At initialisation every block is the identity and the output is
    0 (zero-initialised modulation and decoder, sec. 3.2 "adaLN-Zero block").

    Args:
        in_channels, out_channels: channels of ``x_t`` and of the prediction (the latent's).
        input_size: the height and width ``I`` of the inputs (the latent size); a multiple of
            ``patch_size``. Other multiples are taken too, with the position embedding of
            :meth:`positions` (sampling a larger canvas).
        patch_size: ``p`` in 1, 2, 4, 8: smaller patches, more tokens, more compute and lower
            FID (sec. 5, "Scaling model size and patch size"); DiT-XL/2 is ``p = 2``.
        hidden_size, depth, num_heads: width ``D``, number of blocks, attention heads (Table 1:
            S 384/12/6, B 768/12/12, L 1024/24/16, XL 1152/28/16; :data:`SIZES`).
        mlp_ratio: the MLP's hidden width over ``D``.
        pos_embed: "sincos": the fixed 2-D sin-cos embedding of the paper (:func:`sincos_2d`);
            "learned": a trained one, initialised as ViT (normal, std 0.02).
        num_classes: class-conditional with this many labels, the null class included.
        context_dim: width of context tokens [B, L, context_dim] to cross-attend to (text or
            class tokens); None: no cross-attention.
        use_checkpoint: gradient checkpointing of every block during training.

    The size defaults are DiT-XL/2's.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        input_size: int,
        patch_size: int = 2,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        pos_embed: str = "sincos",
        num_classes: int | None = None,
        context_dim: int | None = None,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if patch_size not in PATCH_SIZES:
            raise ValueError(f"patch_size must be one of {PATCH_SIZES}, got {patch_size}")
        if input_size % patch_size:
            raise ValueError(
                f"input_size {input_size} is not divisible by patch_size {patch_size}; use a "
                "patch size that divides the latent size"
            )
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed={pos_embed!r} is unknown; valid: {POS_EMBEDS}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.input_size = input_size
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.context_dim = context_dim
        self.grid_size = input_size // patch_size

        self.x_embedder = PatchEmbed(in_channels, hidden_size, patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if num_classes is not None:
            self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.empty(1, self.grid_size**2, hidden_size))
        else:  # a function of the sizes, not a weight: left out of the state dict
            device = self.x_embedder.proj.weight.device  # where the module is being built
            positions = sincos_2d(hidden_size, self.grid_size)[None].to(device)
            self.register_buffer("pos_embed", positions, persistent=False)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, context_dim, use_checkpoint)
            for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linear layers (and patch projection, as a linear
        layer) with zero biases, normal(0.02) timestep MLP and label table, zero adaLN
        modulation in every block and a zero final layer (adaLN-Zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        weight = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.normal_(self.pos_embed, std=0.02)
        if self.num_classes is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zero = [block.adaLN_modulation[-1] for block in self.blocks]
        if self.context_dim is not None:
            zero += [block.cross_attn.to_out[0] for block in self.blocks]
        zero += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @classmethod
    def input_multiple(cls, settings: Mapping[str, Any]) -> tuple[int, str]:
        """Inputs must divide into patches of ``settings["patch_size"]`` (the
        :mod:`~ldm_lightning.nn.backbone` protocol)."""
        patch_size = settings.get("patch_size", 2)
        return patch_size, (
            f"the DiT's patch_size {patch_size}; use a patch size that divides the latent size"
        )

    def compile_regions(self) -> list[nn.Module]:
        """The blocks that regional ``torch.compile`` compiles one by one
        (:func:`~ldm_lightning.models.speed.compile_net`): the timestep embedder, every DiT
        block (one shape: one compiled graph for all) and the final layer."""
        return [self.t_embedder, *self.blocks, self.final_layer]

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor | None = None,
        class_labels: Tensor | None = None,
    ) -> Tensor:
        """Predict from ``x`` [B, in_channels, I, I] at ``timesteps`` [B] (long or float);
        ``context`` [B, L, context_dim] iff built with ``context_dim``, ``class_labels`` [B] long
        iff built with ``num_classes``. Returns [B, out_channels, I, I]. ``I`` is ``input_size``
        or another multiple of ``patch_size`` (:meth:`positions`)."""
        timesteps = check_inputs(
            "DiT", x, timesteps, context, class_labels, in_channels=self.in_channels,
            context_dim=self.context_dim, num_classes=self.num_classes,
        )
        height, width = x.shape[-2:]
        if height != width or height % self.patch_size:
            raise ValueError(
                f"input is {height}x{width}; this DiT takes square inputs whose side is a "
                f"multiple of its patch_size {self.patch_size} (built for {self.input_size})"
            )
        tokens = self.x_embedder(x) + self.positions(height // self.patch_size)
        c = self.t_embedder(timesteps)
        if class_labels is not None:
            c = c + self.y_embedder(class_labels)
        for block in self.blocks:
            tokens = block(tokens, c, context)
        return self.unpatchify(self.final_layer(tokens, c))

    def positions(self, grid: int) -> Tensor:
        """The position embedding [1, grid^2, D] of a ``grid x grid`` token grid: ``pos_embed``
        on the grid the DiT was built for. On another (sampling beyond the training resolution,
        LDM sec. 4.3.2): sin-cos recomputed for it (:func:`sincos_2d`: positions 0..grid-1 at the
        trained spacing, exactly what a DiT built at that size holds, so the canvas extends as a
        convolutional UNet's does); a learned embedding resized bicubically (ViT, Dosovitskiy et
        al. 2021, sec. 3.2 "Fine-tuning and higher resolution", as timm's
        ``resample_abs_pos_embed``): the trained grid stretched over the new one."""
        if grid == self.grid_size:
            return self.pos_embed
        width = self.pos_embed.shape[-1]
        if isinstance(self.pos_embed, nn.Parameter):
            table = self.pos_embed.reshape(1, self.grid_size, self.grid_size, width)
            resized = F.interpolate(table.permute(0, 3, 1, 2), size=(grid, grid), mode="bicubic",
                                    align_corners=False, antialias=grid < self.grid_size)
            return resized.permute(0, 2, 3, 1).reshape(1, grid * grid, width)
        return sincos_2d(width, grid)[None].to(self.pos_embed)

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """[B, T, p * p * C] (row-major tokens, each patch ``(p_row, p_col, C)``) ->
        [B, C, I, I], I = p sqrt(T)."""
        b, p, g = tokens.shape[0], self.patch_size, math.isqrt(tokens.shape[1])
        patches = tokens.reshape(b, g, g, p, p, self.out_channels)
        return patches.permute(0, 5, 1, 3, 2, 4).reshape(b, self.out_channels, g * p, g * p)
