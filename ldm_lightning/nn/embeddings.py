"""Sinusoidal timestep embedding for the diffusion UNet."""

import math

import torch
from torch import Tensor


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps.

    The Transformer position encoding (Vaswani et al. 2017, sec. 3.5) that DDPM (Ho et al. 2020,
    sec. 3.3 / App. B) uses to tell the UNet the noise level. With ``half = dim // 2`` and
    frequencies ``w_i = max_period ** (-i / half)`` for ``i = 0 .. half-1``::

        emb(t) = [cos(t w_0), ..., cos(t w_{half-1}), sin(t w_0), ..., sin(t w_{half-1})]

    Cosines come first, as in CompVis' ``timestep_embedding`` (and diffusers with
    ``flip_sin_to_cos=True, downscale_freq_shift=0``), so their UNet weights apply unchanged.
    An odd ``dim`` gets one trailing zero.

    Args:
        timesteps: ``[B]`` integer or float timesteps.
        dim: embedding width.
        max_period: longest period of the sinusoids (smallest frequency ``1 / max_period``).

    Returns:
        ``[B, dim]`` float32 embedding.
    """
    if timesteps.ndim != 1:
        raise ValueError(
            f"timesteps must be 1-D [B], got shape {tuple(timesteps.shape)}; "
            "pass one timestep per batch element"
        )
    if dim < 2:
        raise ValueError(f"embedding dim must be >= 2, got {dim}")
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    freqs = torch.exp(-math.log(max_period) * exponents)
    args = timesteps.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb
