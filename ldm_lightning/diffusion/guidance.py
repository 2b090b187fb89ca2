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

Guidance interval (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval improves
sample and distribution quality", eq. 6): guidance only at noise levels sigma in (lo, hi], the
conditional model elsewhere (w = 1); sigma is the noise-to-signal ratio sigma / alpha, EDM's
sigma, so one interval means the same for every noise process. High noise levels, where guidance
mostly cuts diversity, and low ones, where it does little, are then sampled without it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

ModelFn = Callable[[Tensor, Tensor], Tensor]


def classifier_free_guidance(
    model: nn.Module | Callable[..., Tensor],
    scale: float,
    cond: dict[str, Tensor],
    uncond: dict[str, Tensor],
    rescale: float = 0.0,
    interval: Sequence[float] | None = None,
    sigma_of_time: Callable[[Tensor], Tensor] | None = None,
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
        interval: ``(lo, hi)``: guide only where lo < sigma <= hi (module docstring); None:
            everywhere.
        sigma_of_time: the noise level sigma / alpha of the time ``t`` the model is called with
            (:meth:`~ldm_lightning.diffusion.processes.NoiseProcess.sigma_hat_of_time`); needed
            with ``interval``.
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
    if interval is not None:
        lo, hi = (float(v) for v in interval)
        if not 0 <= lo < hi or sigma_of_time is None:
            raise ValueError(
                f"guidance_interval must be [lo, hi] with 0 <= lo < hi (noise levels sigma / "
                f"alpha), and needs sigma_of_time; got {list(interval)}"
            )
    if scale == 1:
        return lambda x, t: model(x, t, **cond)
    doubled = {key: torch.cat([uncond[key], cond[key]]) for key in cond}

    def guided(x: Tensor, t: Tensor) -> Tensor:
        if interval is not None and not lo < float(sigma_of_time(t[:1])) <= hi:
            return model(x, t, **cond)
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
