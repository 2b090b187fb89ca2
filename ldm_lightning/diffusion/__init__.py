"""Diffusion processes in plain torch: noise schedules, parameterisations, loss weighting,
samplers and guidance (classifier-free, classifier). Knows nothing of Lightning or Hydra."""

from ldm_lightning.diffusion.guidance import classifier_free_guidance, classifier_guidance
from ldm_lightning.diffusion.parameterization import (
    PREDICTIONS,
    predict_eps,
    predict_x0,
    target,
)
from ldm_lightning.diffusion.samplers import (
    SAMPLERS,
    TIMESTEP_SPACINGS,
    DDIMSampler,
    DDPMSampler,
    DPMSolverPP2MSampler,
    Sampler,
    inference_timesteps,
    make_sampler,
    sample,
    sampler_class,
)
from ldm_lightning.diffusion.schedules import SCHEDULES, NoiseSchedule, extract
from ldm_lightning.diffusion.weighting import WEIGHTINGS, loss_weight

__all__ = [
    "PREDICTIONS",
    "SAMPLERS",
    "SCHEDULES",
    "TIMESTEP_SPACINGS",
    "WEIGHTINGS",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverPP2MSampler",
    "NoiseSchedule",
    "Sampler",
    "classifier_free_guidance",
    "classifier_guidance",
    "extract",
    "inference_timesteps",
    "loss_weight",
    "make_sampler",
    "predict_eps",
    "predict_x0",
    "sample",
    "sampler_class",
    "target",
]
