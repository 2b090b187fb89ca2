"""Guidance: classifier-free and classifier guidance.

Classifier-free guidance (Ho & Salimans 2022, "Classifier-free diffusion guidance", eq. 6): the
guided prediction extrapolates from the unconditional output u towards the conditional one c:

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

Classifier guidance (Dhariwal & Nichol 2021, "Diffusion models beat GANs on image synthesis",
sec. 4, Algorithm 2) adds the gradient of a classifier p_phi(y | x_t) trained on noisy inputs to
the score of the diffusion model: with the score grad log p(x_t) = -eps / sigma of any Gaussian
process x_t = alpha x0 + sigma eps,

    eps' = eps - s sigma grad_x log p_phi(y | x_t),    x0' = (x_t - sigma eps') / alpha

is the eps of grad log p(x_t) + s grad log p_phi(y | x_t) (their eps_hat = eps - sqrt(1 - abar)
grad on the DDPM chain). With s = 1 and the exact classifier that is the score of p(x_t | y):
the samples are those of the class asked for; s > 1 sharpens towards it. It changes the
estimates a sampler steps with (:data:`~ldm_lightning.diffusion.samplers.Guide`), so it works
with every sampler and process, alone or on top of classifier-free guidance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ldm_lightning.diffusion.processes import NoiseLevel, NoiseProcess
from ldm_lightning.diffusion.samplers import Guide

ModelFn = Callable[[Tensor, Tensor], Tensor]
# Relative tolerance on (alpha, sigma) between the classifier's process and the sampler's level.
LEVEL_RTOL = 1e-4


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


def classifier_guidance(
    classifier: nn.Module | Callable[[Tensor, Tensor], Tensor],
    labels: Tensor,
    scale: float,
    process: NoiseProcess,
) -> Guide:
    """Classifier guidance as a ``guide(x, level, x0, eps) -> (x0, eps)`` of
    :func:`~ldm_lightning.diffusion.samplers.sample` (module docstring; Dhariwal & Nichol 2021,
    Algorithm 2).

    At each level ``x = alpha x0 + sigma eps`` the gradient ``g = d/dx sum_b log softmax(
    classifier(*process.network_input(x, t)))[b, labels_b]`` is taken with autograd (also inside
    the sampler's ``no_grad``), and the estimates become

        eps' = eps - scale sigma g,  x0' = (x - sigma eps') / alpha = x0 + scale sigma^2 g / alpha,

    except that x0 is left as it is where alpha = 0 (pure noise).

    Args:
        classifier: ``classifier(input [B, ...], time [B]) -> logits [B, K]``, called as
            ``process`` calls a network.
        labels: ``[B]`` class indices in ``0..K-1``, one per sample.
        scale: the guidance scale s (0: the estimates unchanged, 1: p(x | y) with an exact
            classifier).
        process: the noise process the classifier was trained on; its (alpha, sigma) at each
            level's t must be the sampler's (a ValueError otherwise: another process or
            schedule).
    """

    def guide(x: Tensor, level: NoiseLevel, x0: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        if x.shape[0] != len(labels):
            raise ValueError(
                f"classifier guidance has {len(labels)} labels for a batch of {x.shape[0]}"
            )
        _check_level(process, level)
        t = torch.full((x.shape[0],), level.t, dtype=torch.float32, device=x.device)
        y = labels.to(device=x.device, dtype=torch.long)[:, None]
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            logits = classifier(*process.network_input(x_in, t)).float()
            (grad,) = torch.autograd.grad(logits.log_softmax(dim=-1).gather(1, y).sum(), x_in)
        grad = grad.to(eps.dtype)
        eps = eps - scale * level.sigma * grad
        if level.alpha != 0.0:
            x0 = x0 + (scale * level.sigma**2 / level.alpha) * grad
        return x0, eps

    return guide


def _check_level(process: NoiseProcess, level: NoiseLevel) -> None:
    """A ValueError unless ``process`` puts ``level.t`` at the level's (alpha, sigma)."""
    try:
        alpha, sigma = (
            float(c) for c in process.coefficients(torch.tensor([level.t], dtype=torch.float64))
        )
    except (IndexError, RuntimeError):  # a DDPM timestep beyond the classifier's schedule
        alpha = sigma = math.nan
    if not all(
        math.isclose(mine, theirs, rel_tol=LEVEL_RTOL, abs_tol=1e-7)
        for mine, theirs in ((alpha, level.alpha), (sigma, level.sigma))
    ):
        raise ValueError(
            f"the classifier's noise process ({type(process).__name__}) puts t={level.t:g} at "
            f"(alpha, sigma) = ({alpha:.6g}, {sigma:.6g}), but the sampler is at "
            f"({level.alpha:.6g}, {level.sigma:.6g}): train the classifier on the process and "
            "schedule of the model it guides"
        )
