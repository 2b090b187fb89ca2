"""Convolutional encoder and decoder of the first stage (LDM sec. 3.1, Rombach et al. 2022).

The layout follows CompVis' ``ldm/modules/diffusionmodules/model.py`` (itself from the DDPM
code of Ho et al. 2020) so that parameter names match one to one and CompVis / taming
autoencoder checkpoints load with ``load_state_dict(strict=True)``:

    Encoder: conv_in, down.{i}.block.{j}, down.{i}.attn.{j}, down.{i}.downsample,
             mid.block_1, mid.attn_1, mid.block_2, norm_out, conv_out
    Decoder: conv_in, mid.block_1, mid.attn_1, mid.block_2,
             up.{i}.block.{j}, up.{i}.attn.{j}, up.{i}.upsample, norm_out, conv_out

Level ``i`` works at ``resolution / 2**i`` with ``ch * ch_mult[i]`` channels, in both nets,
so ``up.0`` is the decoder's full-resolution level. The downsampling factor is
``f = 2 ** (len(ch_mult) - 1)``.
"""

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


class Normalize(nn.GroupNorm):
    """GroupNorm with 32 groups (fewer for tiny test widths), eps 1e-6, as CompVis."""

    def __init__(self, channels: int) -> None:
        num_groups = min(32, channels)
        if channels % num_groups:
            raise ValueError(
                f"GroupNorm needs channels divisible by {num_groups} groups, got {channels}; "
                "choose ch and ch_mult so every width is < 32 or a multiple of 32"
            )
        super().__init__(num_groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block without time embedding (DDPM's block with ``temb_ch=0``).

    ``y = shortcut(x) + conv2(drop(silu(norm2(conv1(silu(norm1(x)))))))``, where the shortcut
    is a 1x1 conv (``nin_shortcut``) when the width changes and the identity otherwise.

    Shapes: ``[B, in_channels, H, W] -> [B, out_channels, H, W]``.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the ``H*W`` positions, with a residual connection.

    With ``h = norm(x)`` flattened to ``[B, HW, C]`` and 1x1 projections ``q, k, v``::

        y = x + proj_out(softmax(q k^T / sqrt(C)) v)

    (Vaswani et al. 2017, eq. 1), computed with ``scaled_dot_product_attention``.

    Shapes: ``[B, C, H, W] -> [B, C, H, W]``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, c, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Strided 3x3 conv halving H and W; ``[B, C, H, W] -> [B, C, H/2, W/2]``.

    The input is zero-padded by one pixel on the right and bottom only (CompVis' asymmetric
    ``(0, 1, 0, 1)`` pad), which a symmetric ``padding=`` argument cannot express; the
    pretrained weights assume this alignment.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv; ``[B, C, H, W] -> [B, C, 2H, 2W]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """Bottleneck of both nets: ResnetBlock, AttnBlock, ResnetBlock at constant width."""

    def __init__(self, channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def _check_ch_mult(ch_mult: Sequence[int]) -> None:
    if len(ch_mult) == 0:
        raise ValueError("ch_mult must list at least one channel multiplier, e.g. [1, 2, 4]")


class Encoder(nn.Module):
    """Image to latent moments: ``[B, in_channels, H, W] -> [B, C_z, H/f, W/f]``.

    ``C_z = 2 * z_channels`` (mean and log-variance for the KL autoencoder) when ``double_z``,
    else ``z_channels`` (VQ). ``f = 2 ** (len(ch_mult) - 1)``; self-attention is added after
    each residual block of a level whose resolution (relative to ``resolution``) is listed in
    ``attn_resolutions``, and always in the middle.
    """

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_ch_mult(ch_mult)
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.downsample_factor = 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, padding=1)

        curr_res = resolution
        block_in = ch
        self.down = nn.ModuleList()
        for i_level, mult in enumerate(ch_mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            block_out = ch * mult
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i_level != self.num_resolutions - 1:
                level.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(level)

        self.mid = MidBlock(block_in, dropout)
        self.norm_out = Normalize(block_in)
        out_channels = 2 * z_channels if double_z else z_channels
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        f = self.downsample_factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(
                f"input size {tuple(x.shape[-2:])} is not divisible by the downsampling factor "
                f"{f}; crop or resize images to a multiple of {f}"
            )
        h = self.conv_in(x)
        for i_level, level in enumerate(self.down):
            for i_block, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent to image: ``[B, z_channels, h, w] -> [B, out_ch, h*f, w*f]``.

    Mirror of :class:`Encoder` with ``num_res_blocks + 1`` blocks per level. ``in_channels``
    is the image channel count; it is kept for config symmetry with the encoder, as in CompVis.
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        in_channels: int,
        resolution: int,
        z_channels: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_ch_mult(ch_mult)
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.in_channels = in_channels
        self.downsample_factor = 2 ** (self.num_resolutions - 1)

        block_in = ch * ch_mult[-1]
        curr_res = resolution // self.downsample_factor
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, padding=1)
        self.mid = MidBlock(block_in, dropout)

        # Built from the lowest resolution up, then reversed, so that `up.{i}` names the same
        # resolution as `down.{i}` (CompVis prepends for the same reason).
        levels = []
        for i_level in reversed(range(self.num_resolutions)):
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i_level != 0:
                level.upsample = Upsample(block_in)
                curr_res *= 2
            levels.append(level)
        self.up = nn.ModuleList(reversed(levels))

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, padding=1)

    @property
    def last_layer(self) -> Tensor:
        """Weight of ``conv_out``, the layer the adaptive GAN weight differentiates against."""
        return self.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            for i_block, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
