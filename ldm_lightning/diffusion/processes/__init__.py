"""Noise processes: how training noises the data, what the network learns, and what its output
means to a sampler.

Every process here is Gaussian, ``x = alpha(t) x0 + sigma(t) eps`` with ``eps ~ N(0, I)``, and
differs in the path (alpha, sigma), in how training draws t, in the network's input, target and
loss weight, and in the grid of noise levels a sampler walks:

- :class:`DDPMProcess`: the discrete variance-preserving chain of DDPM (Ho et al. 2020),
  alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t), t ~ U{0..T-1}, the network predicts eps, v
  or x0 (:mod:`~ldm_lightning.diffusion.parameterization`).
- :class:`FlowProcess`: rectified flow / flow matching (Liu et al. 2022, Lipman et al. 2023),
  x_t = (1 - t) x0 + t eps, the network predicts the velocity eps - x0.
- :class:`EDMProcess`: Karras et al. 2022 ("Elucidating the design space", EDM), x = x0 +
  sigma eps with preconditioning (Table 1).

One process is chosen per model (``model/process=ddpm|flow|edm``); the samplers of
:mod:`~ldm_lightning.diffusion.samplers` walk any process's :class:`NoiseLevel` grid.

**The sampler's frame.** A sampler sees levels (alpha, sigma) and the denoised estimate x0 (and
eps = (x - alpha x0) / sigma). Second-order ODE solvers also need the variables in which they
integrate: ``y = x / f`` and ``s = sigma / f``, in which the probability-flow ODE is
``dy/ds = (y - x0) / s`` (EDM eq. 4 with s(t) = 1 after rescaling). Two frames are used:
``f = alpha`` (EDM's, for variance-preserving and variance-exploding processes; diffusers'
``EulerDiscreteScheduler`` and ``HeunDiscreteScheduler`` integrate in it) and ``f = 1`` for flow,
where ``s = t`` and the ODE is dx/dt = eps - x0 (diffusers' ``FlowMatchHeunDiscreteScheduler``).
Both integrate the same ODE; first-order steps are identical in either, second-order ones not.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ldm_lightning.diffusion.processes.base import (
    CLEAN,
    KARRAS_RHO,
    PROCESSES,
    NoiseLevel,
    NoiseProcess,
    karras_sigmas,
)
from ldm_lightning.diffusion.processes.ddpm import DDPMProcess
from ldm_lightning.diffusion.processes.edm import EDMProcess
from ldm_lightning.diffusion.processes.flow import TIMESTEP_SAMPLINGS, FlowProcess
from ldm_lightning.diffusion.schedules import NoiseSchedule
from ldm_lightning.utils.targets import resolve_class

__all__ = [
    "CLEAN",
    "KARRAS_RHO",
    "PROCESSES",
    "TIMESTEP_SAMPLINGS",
    "DDPMProcess",
    "EDMProcess",
    "FlowProcess",
    "NoiseLevel",
    "NoiseProcess",
    "karras_sigmas",
    "make_process",
]

log = logging.getLogger(__name__)

DDPM = "ldm_lightning.diffusion.processes.DDPMProcess"
PROCESS_HINT = f"set model.process._target_ to a NoiseProcess subclass ({DDPM}, ...)"


def make_process(
    spec: Mapping[str, Any] | None,
    schedule: Mapping[str, Any] | None = None,
    prediction: str = "eps",
    loss_weighting: str = "uniform",
    min_snr_gamma: float = 5.0,
) -> NoiseProcess:
    """The process of a model config: ``spec`` is ``{_target_: <NoiseProcess class>, **options}``
    (``conf/model/process/``; None: DDPM). The DDPM process also takes the model's ``schedule``
    (``NoiseSchedule.make`` arguments), ``prediction``, ``loss_weighting`` and
    ``min_snr_gamma``; the other processes do not use them, and a setting of them other than
    the default is logged as ignored."""
    options = dict(spec or {})
    cls = resolve_class(options.pop("_target_", DDPM), NoiseProcess, "noise process", PROCESS_HINT)
    if issubclass(cls, DDPMProcess):
        made = NoiseSchedule.make(**{"kind": "linear", **(schedule or {})})
        return cls(made, prediction, loss_weighting, min_snr_gamma, **options)
    ignored = {
        key: value
        for key, value, default in (
            ("prediction", prediction, "eps"),
            ("loss_weighting", loss_weighting, "uniform"),
        )
        if value != default
    }
    if ignored:
        log.warning(
            "model.%s apply to the ddpm process only; the %s process ignores them",
            " and model.".join(f"{k}={v}" for k, v in ignored.items()),
            cls.name,
        )
    return cls(**options)
