"""The sampling loop: :func:`sample` runs any :class:`Sampler` on any process's grid."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ldm_lightning.diffusion.img2img import check_strength, kept_levels, starting_point
from ldm_lightning.diffusion.parameterization import check_prediction
from ldm_lightning.diffusion.processes import DDPMProcess, NoiseLevel, NoiseProcess
from ldm_lightning.diffusion.samplers.base import (
    Guide,
    ModelFn,
    Sampler,
    check_eta,
    check_variance,
    make_sampler,
)
from ldm_lightning.diffusion.schedules import NoiseSchedule


def _check_args(
    eta: float | None,
    variance: str,
    shape: Sequence[int],
    x_T: Tensor | None,
    x_init: Tensor | None,
    strength: float,
) -> None:
    check_variance(variance)
    if eta is not None:
        check_eta(eta)
    check_strength(strength)
    for name, given in (("x_T", x_T), ("x_init", x_init)):
        if given is not None and tuple(given.shape) != tuple(shape):
            raise ValueError(f"{name} has shape {tuple(given.shape)} but shape={tuple(shape)}")
    if x_T is not None and x_init is not None:
        raise ValueError("give x_T (a starting noise) or x_init (an image to edit), not both")
    if x_init is None and strength != 1.0:
        raise ValueError(
            f"strength={strength} applies to image-to-image: give x_init, the data to start from"
        )


def _process(
    schedule: NoiseSchedule | None, prediction: str, process: NoiseProcess | None
) -> NoiseProcess:
    """The process to sample: ``process``, else the DDPM chain of ``schedule``."""
    if process is not None:
        return process
    if schedule is None:
        raise ValueError(
            "sample() needs a schedule (DDPM) or a process (ldm_lightning.diffusion.processes)"
        )
    check_prediction(prediction)
    return DDPMProcess(schedule, prediction)


def sample(
    model_fn: ModelFn,
    shape: Sequence[int],
    schedule: NoiseSchedule | None = None,
    sampler: str | Mapping[str, Any] | Sampler = "ddim",
    steps: int | None = 50,
    eta: float | None = None,
    prediction: str = "eps",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    x_T: Tensor | None = None,
    clip_denoised: bool = False,
    variance: str = "fixed_small",
    progress: bool = False,
    return_trajectory: bool = False,
    timestep_spacing: str | None = None,
    process: NoiseProcess | None = None,
    guide: Guide | None = None,
    x_init: Tensor | None = None,
    strength: float = 1.0,
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Draw samples by running the reverse process from noise.

    Args:
        model_fn: ``model_fn(input [B, ...], time [B]) -> [B, ...]``, the network as the process
            calls it (:meth:`~ldm_lightning.diffusion.processes.NoiseProcess.network_input`):
            for DDPM ``(x_t, t)`` with integer timesteps, predicting ``prediction`` ("eps" | "v"
            | "x0"); wrap it with classifier-free guidance if wanted.
        shape: (B, C, H, W) or any (B, ...) shape of the samples.
        schedule: the training noise schedule of a DDPM model (with ``prediction``); or give
            ``process``.
        sampler: "ddpm" (ancestral, DDPM Algorithm 2), "ddim" (DDIM eq. 12), "dpmpp_2m"
            (DPM-Solver++(2M), deterministic), "euler", "heun" (EDM Algorithms 2 and 1),
            "euler_ancestral" or another name of :data:`SAMPLERS`; or a
            ``{_target_: ..., **options}`` dict, or a :class:`Sampler` (:func:`make_sampler`).
        steps: number of steps (model evaluations, two per step for Heun but the last); ``None``
            runs all ``schedule.timesteps`` of a DDPM schedule (T, which "dpmpp_2m" allows only
            with "trailing": see :func:`inference_timesteps`).
        eta: the share of fresh noise of the samplers that take it (DDIM: 0 deterministic,
            1 DDPM's posterior variance; Euler ancestral: 1 ancestral); None: each sampler's
            own default (DDIM 0, Euler ancestral 1). Like ``variance``, it goes to the samplers
            that take it, unless a dict or a Sampler sets it.
        generator: source of all random numbers (see module docstring).
        device: where to sample; defaults to ``x_T``'s (or ``x_init``'s) device, else the CPU.
        x_T: [B, ...] starting point instead of drawing it (noise scaled by the process's
            :meth:`~ldm_lightning.diffusion.processes.NoiseProcess.initial_scale`).
        clip_denoised: clamp predicted x0 to [-1, 1] before each step (pixel-space data).
        variance: DDPM's reverse variance, "fixed_small" (beta_tilde) or "fixed_large" (beta).
        progress: show a tqdm progress bar.
        return_trajectory: also return the predicted x0 of every step.
        timestep_spacing: the grid, one of the process's ``spacings`` (DDPM: "leading" |
            "trailing" | "linspace" | "karras", see :func:`inference_timesteps`); None: the
            process's default ("trailing" for DDPM).
        process: the noise process (:mod:`~ldm_lightning.diffusion.processes`) instead of
            ``schedule`` and ``prediction``.
        guide: ``guide(x, level, x0, eps) -> (x0, eps)`` applied to every estimate (classifier
            guidance, :func:`~ldm_lightning.diffusion.guidance.classifier_guidance`).
        x_init: [B, ...] clean data to edit (SDEdit, :mod:`~ldm_lightning.diffusion.img2img`):
            noised to the first of the grid's last ceil(``strength * steps``) levels, which the
            sampler then walks.
        strength: in [0, 1], with ``x_init``: 0 returns ``x_init``, 1 samples from pure noise
            exactly as without it.

    Returns:
        x0 samples [B, ...] float32, or (x0, [predicted x0 [B, ...] per step]) with
        ``return_trajectory``.
    """
    _check_args(eta, variance, shape, x_T, x_init, strength)
    rule = make_sampler(sampler, eta=eta, variance=variance)
    process = _process(schedule, prediction, process)
    if steps is None:
        if not isinstance(process, DDPMProcess):
            raise ValueError(
                f"steps=None (all timesteps) needs the DDPM process, not {process.name}"
            )
        steps = process.schedule.timesteps
    levels = process.sampling_levels(steps, timestep_spacing, zero_endpoint=rule.zero_endpoint)
    levels = kept_levels(levels, strength)
    if device is None:
        given = x_T if x_T is not None else x_init
        device = given.device if given is not None else torch.device("cpu")
    process = process.to(device)
    noise_device = generator.device if generator is not None else torch.device("cpu")

    def noise() -> Tensor:
        return torch.randn(tuple(shape), generator=generator, device=noise_device).to(device)

    def denoise(x: Tensor, level: NoiseLevel) -> tuple[Tensor, Tensor]:
        t = torch.full((shape[0],), level.t, dtype=torch.float32, device=device)
        network_input, time = process.network_input(x, t)
        x0, eps = process.denoise(model_fn(network_input, time).float(), x, t)
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
            eps = (x - level.alpha * x0) / level.sigma
        return guide(x, level, x0, eps) if guide is not None else (x0, eps)

    pairs = list(zip(levels[:-1], levels[1:], strict=True))
    iterator = pairs
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(pairs, desc=f"{rule.name} sampling")

    trajectory: list[Tensor] = []
    rule.reset()
    with torch.no_grad():
        if x_T is None:
            x0 = None if x_init is None else x_init.to(device=device, dtype=torch.float32)
            x = starting_point(x0, levels[0], strength, noise, process.initial_scale(levels[0]))
        else:
            x = x_T.to(device=device, dtype=torch.float32)
        for t, s in iterator:
            x0, eps = denoise(x, t)
            x_s = rule.step(x, x0, eps, t, s, noise)
            if rule.order == 2 and not s.clean:
                x_s = rule.correct(x, x0, eps, x_s, *denoise(x_s, s), t, s)
            x = x_s
            if return_trajectory:
                trajectory.append(x0)
    return (x, trajectory) if return_trajectory else x
