"""Classifier-free guidance (Ho & Salimans 2022, "Classifier-free diffusion guidance", eq. 6).

The guided prediction extrapolates from the unconditional output u towards the conditional one c:

    pred = u + w (c - u)         (w = 1: conditional model, w = 0: unconditional)

Ho & Salimans write it for eps. The map is linear in the model output and x0, eps and v are affine
in one another at fixed (x_t, t), so applying it to a v or x0 output gives the same guided sample.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

ModelFn = Callable[[Tensor, Tensor], Tensor]


def classifier_free_guidance(
    model: nn.Module | Callable[..., Tensor],
    scale: float,
    cond: dict[str, Tensor],
    uncond: dict[str, Tensor],
) -> ModelFn:
    """Wrap a conditional denoiser into a guided ``model_fn(x [B, ...], t [B]) -> [B, ...]``.

    Both branches run in ONE forward pass on a doubled batch,
    ``model(cat[x, x], cat[t, t], **{k: cat[uncond[k], cond[k]]})``; the first half of the
    output is u, the second c. With ``scale == 1`` it is a plain ``model(x, t, **cond)`` call.

    Args:
        model: called as ``model(x, t, **conditioning)``.
        scale: guidance weight w.
        cond: conditioning keyword tensors, each with batch size B (e.g. ``context`` [B, L, D]).
        uncond: the null conditioning with the same keys and shapes as ``cond``.
    """
    if set(cond) != set(uncond):
        raise ValueError(
            f"cond and uncond need the same keys, got {sorted(cond)} and {sorted(uncond)}"
        )
    for key, value in cond.items():
        if value.shape != uncond[key].shape:
            raise ValueError(
                f"cond[{key!r}] has shape {tuple(value.shape)} but uncond[{key!r}] has "
                f"{tuple(uncond[key].shape)}; they must match"
            )
    if scale == 1:
        return lambda x, t: model(x, t, **cond)
    doubled = {key: torch.cat([uncond[key], cond[key]]) for key in cond}

    def guided(x: Tensor, t: Tensor) -> Tensor:
        out_uncond, out_cond = model(torch.cat([x, x]), torch.cat([t, t]), **doubled).chunk(2)
        return out_uncond + scale * (out_cond - out_uncond)

    return guided
