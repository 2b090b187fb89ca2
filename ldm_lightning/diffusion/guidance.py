"""Classifier-free guidance (Ho & Salimans 2022, "Classifier-free diffusion guidance", eq. 6).

The guided prediction extrapolates from the unconditional output u towards the conditional one c:

    pred = u + w (c - u)         (w = 1: conditional model, w = 0: unconditional)

Ho & Salimans write it for eps. The map is linear in the model output and x0, eps and v are affine
in one another at fixed (x_t, t), so applying it to a v or x0 output gives the same guided sample.

Guidance rescale (Lin et al. 2024, "Common diffusion noise schedules and sample steps are
flawed", sec. 3.4, eqs. 15-17) pulls the per-sample standard deviation of the guided output back
towards the conditional one, against the over-exposed, over-saturated samples of large w:

    pred_rescaled = pred * std(c) / std(pred)
    pred_final    = phi * pred_rescaled + (1 - phi) * pred

with std over every dimension but the batch. It is not linear, so it depends on what the model
outputs; like diffusers' ``guidance_rescale`` it is applied to the model's output (eps for an
eps-prediction model; the paper uses v).
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
    rescale: float = 0.0,
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
        rescale: guidance rescale phi in [0, 1] (0: plain guidance); see the module docstring.
    """
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
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
        guided_out = out_uncond + scale * (out_cond - out_uncond)
        return rescale_guidance(guided_out, out_cond, rescale) if rescale else guided_out

    return guided


def rescale_guidance(guided: Tensor, cond: Tensor, rescale: float) -> Tensor:
    """Lin et al. 2024 eqs. 15-17: ``phi * guided * std(cond) / std(guided) + (1 - phi) *
    guided``, standard deviations per sample over all non-batch dimensions."""
    dims = tuple(range(1, guided.ndim))
    ratio = cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return rescale * guided * ratio + (1 - rescale) * guided
