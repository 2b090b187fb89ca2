"""A small conv encoder on autoencoder latents: the image tower of CLIP-style pretraining.

``z [B, C, h, w]`` (first-stage latents) -> 3x3 conv -> per level a residual block
``x + conv(SiLU(GN(conv(SiLU(GN(x))))))`` and a strided 3x3 conv (2x down) between levels
-> GroupNorm, SiLU, global average pool -> linear -> ``[B, out_dim]``. Latents are already
``f`` times smaller than the image, so a few levels see the whole picture.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4) or 1, channels)


class ResidualBlock(nn.Module):
    """``x + conv(SiLU(GN(conv(SiLU(GN(x))))))`` at constant width."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _norm(channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            _norm(channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class LatentImageEncoder(nn.Module):
    """Latents ``[B, in_channels, h, w]`` -> embeddings ``[B, out_dim]``.

    Args:
        in_channels: latent channels of the first stage.
        channels: width per level; ``len(channels) - 1`` 2x downsamplings.
        out_dim: output width.
    """

    def __init__(self, in_channels: int, channels: Sequence[int] = (64, 128), out_dim: int = 128):
        super().__init__()
        if not channels:
            raise ValueError("channels must list at least one level width, e.g. [64, 128]")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels[0], 3, padding=1)]
        for level, width in enumerate(channels):
            if level:
                layers.append(nn.Conv2d(channels[level - 1], width, 3, stride=2, padding=1))
            layers.append(ResidualBlock(width))
        layers += [_norm(channels[-1]), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.proj = nn.Linear(channels[-1], out_dim)

    def forward(self, z: Tensor) -> Tensor:
        """``z`` [B, C, h, w] -> [B, out_dim]."""
        return self.proj(self.body(z))
