"""Config liveness: every key of the entry-point and model configs has an observable effect.

The keys are read from the YAML files themselves: ``conf/sample.yaml``, ``conf/evaluate.yaml``,
``conf/compare_report.yaml`` and every ``conf/model/*.yaml`` as Hydra composes it (its defaults
included: vq.yaml into kl.yaml, conditioner_text.yaml into conditioner_class.yaml, each
``conf/scheduler`` option into ldm.yaml's and noisy_classifier.yaml's ``schedule``, each
``conf/model/process`` option into their ``process``, each ``conf/model/sampler`` option into
ldm.yaml's ``sampling.sampler``, each ``conf/model/backbone`` option into ldm.yaml's ``unet``), and
every option of ldm.yaml's ``model/conditioning`` group, each a config of its own
(``model/conditioning/<option>``, keys relative to ``model.conditioning``). ``TABLE`` gives each
``<config>:<dotted key>`` one entry:

- :class:`Live`: the tiny object is built twice, with the key's base value and with ``value``
  (both with ``context``), and ``observe`` must differ: the samples, the loss, the module's
  structure or weights, the optimizer, the files an entry point writes. Where the only effect
  that can be seen offline is a refusal, ``raises`` names the error the changed value gives.
- :class:`Inert`: why the key changes nothing in this config (with ``observe`` given, checked:
  changing it leaves that unchanged).
- :class:`Elsewhere`: the test that asserts its effect (it must exist).

A key added to one of these files without an entry fails
``test_every_config_key_has_exactly_one_entry``, and so does an entry whose key is gone.
``sampling.timestep_spacing``, set, documented and never passed to the sampler, is the kind of
key this catches.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import io
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import hydra
import pytest
import torch
import torch.nn.functional as F
import transformers
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader

from ldm_lightning.callbacks.timed_checkpoints import TIME_KEY
from ldm_lightning.compare import compare
from ldm_lightning.data.shapes import ShapesDataset
from ldm_lightning.diffusion.latent_norm import LatentStats
from ldm_lightning.evaluate import evaluate
from ldm_lightning.losses.contrastive import contrastive_loss
from ldm_lightning.models import ConditionerModule, NoisyClassifierModule
from ldm_lightning.models.checkpoints import read_checkpoint
from ldm_lightning.models.conditioner import ENCODERS
from ldm_lightning.nn.condition_encoders import CaptionEncoder
from ldm_lightning.sample import run as sample_run
from tests.checkpoint_utils import foreign_copy, perturbed_copy, stage_only, write_checkpoint
from tests.clip_utils import write_tiny_clip
from tests.hydra_utils import TINY_AUTOENCODER, compose_config
from tests.losses.test_perceptual import no_network  # noqa: F401 - a fixture
from tests.metrics.test_protocol_metrics import write_tiny_clip_model
from tests.models.test_conditioning import CAPTIONS, TEXT, conditioning_config, tiny_ldm
from tests.models.test_diffusion_module import TINY_LDM
from tests.models.test_parts import TinyBackbone
from tests.nn.test_unet import _randomise as randomise_zero_parameters
from tests.test_conditioning_train import TINY_CLIP
from tests.test_evaluate import EXTRACTOR, TINY_DATA, checkpoints  # noqa: F401 - a fixture
from tests.test_sampling import wide_png

CONF = Path(__file__).parents[1] / "conf"
CONDITIONING = "model/conditioning"  # a group of model/ldm; each option is a config here
SPATIAL = "model/spatial"  # likewise (default null: none)
ENTRY_CONFIGS = ("sample", "evaluate", "compare_report")
SKIPPED = {"_convert_", "_partial_", "_recursive_"}  # instantiate's, not ours
# The defaults list, Hydra's own settings and the class instantiate builds; a nested _target_
# (model.optimizer, model.unet, model.encoder) chooses a part the module builds: ours.
SKIPPED_TOP = {"defaults", "hydra", "_target_"}


# ---------------------------------------------------------------------------- table entries
class _Keep:
    def __repr__(self) -> str:
        return "<the config's value>"


KEEP = _Keep()


@dataclass(frozen=True)
class Live:
    """Changing the key from ``base`` to ``value`` changes ``observe`` (or raises ``raises``)."""

    observe: str
    value: Any
    base: Any = KEEP
    context: Mapping[str, Any] = field(default_factory=dict)
    raises: str | None = None
    fixtures: tuple[str, ...] = ()


@dataclass(frozen=True)
class Inert:
    """The key changes nothing here, for ``reason``; checked on ``observe`` when given (from
    ``context``)."""

    reason: str
    observe: str | None = None
    value: Any = None
    context: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Elsewhere:
    """``test`` (``tests/<path>.py::<name>``) asserts the key's effect: ``what``."""

    test: str
    what: str


Entry = Live | Inert | Elsewhere


# Observations (OBSERVERS). Models: structure (state_dict names and shapes), weights (state_dict
# values), loss (the training loss of a fixed batch in train mode, fixed seeds), codebook (the VQ
# codebook after one training forward), sample (LDM.sample(n=2, seed=0)), log_images (the image
# logger's grids), optimizer (class, betas, weight decay, rate over 400 steps), speed (compiled
# nets, channels_last weights), recompute (UNet module calls in one training step), trainable (the
# parameters that require gradients). Entry points:
# samples (the PNGs sample.run writes), report (metrics.json less what it repeats from the
# config, and the files evaluate writes), progress (a progress bar on stderr), devices (where
# modules are moved), run_dir (Hydra's run directory).
# Placeholders: <ldm>, <ae>, ... are the checkpoints of the stage_files fixture, <run> the run
# directory of one observation.
def refused_unless_trusted(observe: str, context: dict[str, Any]) -> Live:
    """``trust_checkpoint``: true reads the checkpoint ``context`` points at, whose pickle names
    code outside torch's weights-only allowlist (a harmless Fraction); false refuses it."""
    return Live(observe, False, base=True, context=context, raises="trust_checkpoint=true")


def optimizer_probes(other: str, scale_lr: bool, weight_decay: bool = True) -> dict[str, Entry]:
    """The ``optimizer.*`` keys: the class (``other`` instead of the config's), rates, betas and
    decay Lightning would step with."""
    probes: dict[str, Entry] = {
        "optimizer._target_": Live("optimizer", other),
        "optimizer.base_lr": Live("optimizer", 1.0e-3),
        "optimizer.scale_lr": Live("optimizer", not scale_lr),  # batch 4: 4x the rate
        "optimizer.betas": Live("optimizer", [0.8, 0.95]),
        "optimizer.warmup_steps": Live("optimizer", 7),
        "optimizer.schedule": Live("optimizer", "cosine"),
        "optimizer.min_lr_ratio": Live("optimizer", 0.5, context={"optimizer.schedule": "cosine"}),
    }
    if weight_decay:
        probes["optimizer.weight_decay"] = Live("optimizer", 0.1)
    return probes


def sampler_yaml(option: str) -> dict[str, Any]:
    """``model.sampling.sampler`` as ``model/sampler=<option>`` sets it."""
    return OmegaConf.to_container(OmegaConf.load(CONF / "model" / "sampler" / f"{option}.yaml"))


def process_yaml(option: str) -> dict[str, Any]:
    """``model.process`` as ``model/process=<option>`` sets it."""
    return OmegaConf.to_container(OmegaConf.load(CONF / "model" / "process" / f"{option}.yaml"))


def backbone_yaml(option: str) -> dict[str, Any]:
    """``model.unet`` as ``model/backbone=<option>`` sets it (an option without defaults)."""
    return OmegaConf.to_container(OmegaConf.load(CONF / "model" / "backbone" / f"{option}.yaml"))


FLOW = {"process": process_yaml("flow")}
EDM = {"process": process_yaml("edm")}
# A tiny DiT-S: model/backbone=dit_s with small sizes.
DIT = {"unet": {**backbone_yaml("dit_s"), "hidden_size": 16, "depth": 2, "num_heads": 2}}
LEARNED_DIT = {"unet": {**DIT["unet"], "pos_embed": "learned"}}
CLASS_SAMPLES = {"ckpt_path": "<class_ldm>", "labels": [0, 5]}
TEXT_SAMPLES = {"ckpt_path": "<text_ldm>", "prompts": ["a red circle on a gray background"]}
CLASSIFIER_SAMPLES = {"classifier_scale": 20.0, "labels": [0, 5]}
SAMPLE: dict[str, Entry] = {
    "task_name": Live("run_dir", "another_task"),
    "ckpt_path": Live("samples", "<ldm_perturbed>"),
    "trust_checkpoint": refused_unless_trusted("samples", {"ckpt_path": "<ldm_foreign>"}),
    "num_samples": Live("samples", 2),
    "batch_size": Live("samples", 3),  # batch i has seed + i
    "sampler": Live("samples", "ddpm"),
    "steps": Live("samples", 2),
    "eta": Live("samples", 1.0),
    "timestep_spacing": Live("samples", "leading"),
    "guidance_scale": Live("samples", 3.0, context=CLASS_SAMPLES),
    "guidance_rescale": Live("samples", 0.7, context={**CLASS_SAMPLES, "guidance_scale": 3.0}),
    "guidance_interval": Live(
        "samples", [0.5, 2.0], context={**CLASS_SAMPLES, "guidance_scale": 3.0}
    ),
    # The untrained <classifier> of <ldm>'s latent space, and a copy with other weights.
    "classifier_ckpt": Live("samples", "<classifier_other>", base="<classifier>",
                            context=CLASSIFIER_SAMPLES),
    "classifier_scale": Live("samples", 20.0,
                             context={"classifier_ckpt": "<classifier>", "labels": [0, 5]}),
    "labels": Live("samples", [5], base=[0], context={"ckpt_path": "<class_ldm>"}),
    "prompts": Live(
        "samples", ["a blue square on a white background"], base=TEXT_SAMPLES["prompts"],
        context={"ckpt_path": "<text_ldm>"},
    ),
    "negative_prompts": Live("samples", ["red"], context={**TEXT_SAMPLES, "guidance_scale": 3.0}),
    # true samples a class model with the null class; false without labels asks for them.
    "unconditional": Live(
        "samples", False, base=True, context={"ckpt_path": "<class_ldm>"},
        raises="or unconditional=True",
    ),
    "image_size": Live("samples", 32),  # <ldm>: 16 px, f 2, UNet downsampling 2
    "init_image": Live("samples", "<init_png>"),
    "strength": Live("samples", 0.3, context={"init_image": "<init_png>"}),
    "seed": Live("samples", 1),
    "device": Live("devices", "meta"),
    "grid_nrow": Live("samples", 3),  # null: int(sqrt(3)) = 1 per row
    "per_class": Elsewhere(
        "tests/test_class_names.py::test_per_class_writes_one_folder_per_class",
        "N samples of every class, written to samples/<class name>/",
    ),
    "task": Elsewhere(
        "tests/test_sample_tasks.py::test_upscale_and_semantic_sample_their_condition",
        "the task's files become the spatial condition of the samples (the library's samples "
        "with those inputs); a task the checkpoint was not trained for is refused",
    ),
    "image": Elsewhere(
        "tests/test_sample_tasks.py::test_inpainting_keeps_the_unmasked_region_and_fills_the_masked_one",
        "the known image: its unmasked pixels are the written samples' exactly",
    ),
    "mask": Elsewhere(
        "tests/test_sample_tasks.py::test_inpainting_keeps_the_unmasked_region_and_fills_the_masked_one",
        "the region filled by the model; the rest is the image's",
    ),
}

CLASS_EVAL = {"ckpt_path": "<class_ldm>", "data.image_size": 8}  # no run config: cfg.data
# An autoencoder copy without a run config, so on cfg.data: LPIPS alex and squeeze need 32 px.
AE_EVAL = {"ckpt_path": "<ae_perturbed>", "data.image_size": 32, "lpips.pretrained_backbone": False}
# FD-DINOv2 with an 8 px stand-in network, which the protocol's filter resizes for.
DINO_EVAL = {"protocol.metrics": ["fid", "fd_dinov2"],
             "dinov2_extractor": "tests.test_evaluate_protocol.TinyDino"}
CLIP_EVAL = {"ckpt_path": "<text_ldm>", "data.image_size": 8, "protocol.metrics": ["clip_score"]}
EVALUATE: dict[str, Entry] = {
    "task_name": Live("run_dir", "another_task"),
    "ckpt_path": Live("report", "<ldm_perturbed>"),
    "trust_checkpoint": refused_unless_trusted("report", {"ckpt_path": "<ldm_foreign>"}),
    "device": Live("devices", "meta"),
    "protocol.num_samples": Live("report", 2),
    "protocol.split": Live("report", "val"),
    "protocol.num_real": Live("report", 8),
    "protocol.seed": Live("report", 1),
    "protocol.resize": Live("report", "tf1_bilinear", context=DINO_EVAL),
    "protocol.metrics": Live("report", ["fid", "kid"]),
    "protocol.kid_subset_size": Live("report", 3, context={"protocol.metrics": ["fid", "kid"]}),
    "protocol.is_splits": Live("report", 2, base=4, context={"protocol.metrics": ["fid", "is"]}),
    "protocol.prc_neighborhood": Live(
        "report", 1, context={"protocol.metrics": ["fid", "precision_recall"]}
    ),
    "batch_size": Live("report", 2),
    "sampler": Live("report", "ddpm"),
    "steps": Live("report", 2),
    "eta": Live("report", 1.0),
    "timestep_spacing": Live("report", "leading"),
    "guidance_scale": Live("report", 3.0, context=CLASS_EVAL),
    "guidance_rescale": Live("report", 0.7, context={**CLASS_EVAL, "guidance_scale": 3.0}),
    "guidance_interval": Live("report", [0.5, 2.0], context={**CLASS_EVAL, "guidance_scale": 3.0}),
    # Guided towards the real images' labels.
    "classifier_ckpt": Live("report", "<classifier_other>", base="<classifier>",
                            context={"classifier_scale": 20.0}),
    "classifier_scale": Live("report", 20.0, context={"classifier_ckpt": "<classifier>"}),
    "feature_extractor": Live("report", "tests.metrics.test_fid.CountingFeatures"),
    "dinov2_extractor": Live("report", "tests.metrics.test_fid.CountingFeatures",
                             context=DINO_EVAL),
    "clip_model": Live("report", "<tiny_clip_model_other>", base="<tiny_clip_model>",
                       context=CLIP_EVAL),
    "stats_dir": Live("report", "<run>/other_stats"),
    "lpips.net": Live("report", "alex", base="squeeze", context=AE_EVAL),
    # Offline, true can only be seen trying to load the ImageNet backbone.
    "lpips.pretrained_backbone": Live(
        "report", True, base=False, context={**AE_EVAL, "lpips.net": "squeeze"},
        raises="pretrained_backbone=false", fixtures=("no_network",),
    ),
    "save_grid": Live("report", False),
    "progress": Live("progress", True),
}

# The report's runs (stage_files): <compare_runs> holds two runs of untrained class LDMs on 8 px
# shapes, <compare_uncond> one of the unconditional <ldm> on 16 px.
COMPARE: dict[str, Entry] = {
    "task_name": Live("run_dir", "another_task"),
    "runs": Live("report", ["<compare_runs>/0"]),
    "out_dir": Live("report", "<run>/elsewhere"),
    "trust_checkpoint": refused_unless_trusted("report", {"runs": ["<compare_foreign>"]}),
    "device": Live("devices", "meta"),
    "per_class": Live("report", 2),
    "num_samples": Live("report", 2, context={"runs": ["<compare_uncond>"]}),
    "batch_size": Live("report", 5),  # batch i has seed + i
    "sampler": Live("report", "ddim"),
    "steps": Live("report", 3),
    "eta": Live("report", 1.0, context={"sampler": "ddim"}),  # dpmpp_2m takes none
    "timestep_spacing": Live("report", "leading"),
    "guidance_scale": Live("report", 1.0),
    "guidance_rescale": Live("report", 0.7),
    "guidance_interval": Live("report", [0.6, 2.0]),  # sigma 1.32 in, 0.54 out (2 steps)
    "seed": Live("report", 1),
    "split": Live("report", "val"),
    "num_real": Live("report", 8),
    "feature_extractor": Live("report", "tests.metrics.test_fid.CountingFeatures"),
    "stats_dir": Live("report", "<run>/other_stats"),
    "save_grids": Live("report", False),
    "progress": Live("progress", True),
}

AUTOENCODER: dict[str, Entry] = {
    # The encoder places attention by resolution, so image_size moves it.
    "image_size": Live("structure", 64, context={"attn_resolutions": [16]}),
    "in_channels": Live("structure", 1),
    "ch": Live("structure", 16),
    "ch_mult": Live("structure", [1, 1]),
    "num_res_blocks": Live("structure", 2),
    "attn_resolutions": Live("structure", [16]),
    "dropout": Live("loss", 0.5),
    "z_channels": Live("structure", 2),
    "embed_dim": Live("structure", 2),
    "loss.rec_loss": Live("loss", "l2"),
    "loss.perceptual_weight": Live("loss", 1.0),  # tiny: 0, as shapes_vq (LPIPS is slow)
    "loss.disc_weight": Live("loss", 0.1, context={"loss.disc_start": 0}),
    "loss.disc_loss": Live("loss", "vanilla", context={"loss.disc_start": 0}),
    "loss.disc_num_layers": Live("structure", 2),
    "loss.disc_ndf": Live("structure", 4),
    "perceptual.net": Live("loss", "alex", context={"loss.perceptual_weight": 1.0}),
    "perceptual.pretrained_backbone": Live(
        "loss", True, context={"loss.perceptual_weight": 1.0},
        raises="pretrained_backbone=false", fixtures=("no_network",),
    ),
    **optimizer_probes("torch.optim.AdamW", scale_lr=True, weight_decay=False),
    "num_log_images": Live("log_images", 2),
    "gradient_clip_val": Elsewhere(
        "tests/test_scale.py::test_autoencoder_gradient_clipping_bounds_each_optimizers_norm",
        "a training run with model.gradient_clip_val=1e-2 steps both optimizers with norm 1e-2",
    ),
    "compile": Live("speed", True),
    "channels_last": Live("speed", True),
}
VQ: dict[str, Entry] = {
    **AUTOENCODER,
    "regularizer": Live("structure", "kl"),
    "n_embed": Live("structure", 8),
    "beta": Live("loss", 1.0),
    "ema_codebook": Live("codebook", True),
    "ema_decay": Live("codebook", 0.5, context={"ema_codebook": True}),
    "restart_dead_codes": Live("codebook", True),
    "loss.codebook_weight": Live("loss", 2.0),
    "loss.disc_start": Live("loss", 1),  # the loss is taken at batch 0
}
VQ_ONLY = "a VQ codebook setting inherited from vq.yaml; regularizer=kl has no codebook"
KL: dict[str, Entry] = {
    **AUTOENCODER,
    "regularizer": Live("structure", "vq"),
    "loss.kl_weight": Live("loss", 1.0),
    "loss.disc_start": Live("loss", 0),
    "n_embed": Inert(VQ_ONLY, "structure", 8),
    "beta": Inert(VQ_ONLY, "loss", 1.0),
    "ema_codebook": Inert(VQ_ONLY, "loss", True),
    "ema_decay": Inert(VQ_ONLY, "loss", 0.5),
    "restart_dead_codes": Inert(VQ_ONLY, "loss", True),
    "loss.codebook_weight": Inert(VQ_ONLY, "loss", 2.0),
}

FIRST_STAGE: dict[str, Entry] = {
    "first_stage.ckpt_path": Live(
        "weights", "<ae_perturbed>", base="<ae>", context={"first_stage.identity": False}
    ),
    "first_stage.identity": Live(
        "structure", True, base=False, context={"first_stage.ckpt_path": "<ae>"}
    ),
    "first_stage.trust_checkpoint": refused_unless_trusted(
        "structure", {"first_stage.identity": False, "first_stage.ckpt_path": "<ae_foreign>"}
    ),
}
LDM: dict[str, Entry] = {
    "image_size": Live("sample", 32),
    **FIRST_STAGE,
    "unet._target_": Live("structure", f"{TinyBackbone.__module__}.{TinyBackbone.__qualname__}"),
    # null follows the first stage's latent channels, the only value that works.
    "unet.in_channels": Live("structure", 4, raises="in_channels=4"),
    "unet.out_channels": Live("structure", 4, raises="out_channels=4"),
    "unet.model_channels": Live("structure", 8),
    "unet.channel_mult": Live("structure", [1, 1]),
    "unet.num_res_blocks": Live("structure", 1),
    "unet.attention_resolutions": Live("structure", [1]),
    "unet.num_head_channels": Live("sample", 4),  # same weights, other heads
    "unet.dropout": Live("loss", 0.5),
    "unet.use_checkpoint": Live("recompute", True),
    # The keys of the DiT options of model/backbone (dit_s, dit_b, ...) beside the UNet's.
    # null follows the latent size (16 here); a DiT built for 8 takes 16 too, with sin-cos
    # positions recomputed (the same samples) or a learned table resized from its 4x4 grid.
    "unet.input_size": Live("structure", 8, context=LEARNED_DIT),
    "unet.patch_size": Live("structure", 4, context=DIT),
    "unet.hidden_size": Live("structure", 32, context=DIT),
    "unet.depth": Live("structure", 1, context=DIT),
    "unet.num_heads": Live("sample", 4, context=DIT),  # same weights, other heads
    "unet.mlp_ratio": Live("structure", 2.0, context=DIT),
    "unet.pos_embed": Live("structure", "learned", context=DIT),
    "prediction": Live("loss", "v"),
    "loss_weighting": Live("loss", "min_snr"),
    "min_snr_gamma": Live("loss", 1.0, context={"loss_weighting": "min_snr"}),
    "offset_noise": Live("loss", 0.1),
    "process._target_": Live("loss", "ldm_lightning.diffusion.processes.FlowProcess"),
    # The options of the model/process group's configs (the keys beside their _target_).
    "process.timestep_sampling": Live("loss", "uniform", context=FLOW),
    "process.logit_mean": Live("loss", 1.0, context=FLOW),
    "process.logit_std": Live("loss", 2.0, context=FLOW),
    "process.shift": Live("loss", 3.0, context=FLOW),
    "process.time_scale": Live("loss", 1.0, context=FLOW),
    "process.sigma_data": Live("loss", 0.5, context=EDM),
    "process.p_mean": Live("loss", 0.0, context=EDM),
    "process.p_std": Live("loss", 2.0, context=EDM),
    "process.sigma_min": Live("sample", 0.05, context=EDM),
    "process.sigma_max": Live("sample", 10.0, context=EDM),
    "process.rho": Live("sample", 3.0, context=EDM),
    "scale_factor": Live("loss", 0.5),  # null: estimated at fit start
    "scale_factor_batches": Live("loss", 1),
    "latent_norm": Live("loss", "channel"),  # per-channel mean and std, estimated at fit start
    **optimizer_probes("torch.optim.Adam", scale_lr=True),
    "sampling.sampler": Live("sample", "ddpm"),
    # The options of the model/sampler group's configs (the keys beside their _target_).
    "sampling.sampler.eta": Live(
        "sample", 1.0, context={"sampling.sampler": sampler_yaml("ddim")}
    ),
    "sampling.sampler.variance": Live(
        "sample", "fixed_large", context={"sampling.sampler": sampler_yaml("ddpm")}
    ),
    "sampling.sampler._target_": Elsewhere(
        "tests/models/test_diffusion_module.py::"
        "test_model_sampling_names_a_sampler_of_ones_own_by_target",
        "a user's Sampler named by model.sampling.sampler._target_ runs in the LDM's samples",
    ),
    "sampling.steps": Live("sample", 2),
    "sampling.eta": Live("sample", 1.0),
    "sampling.timestep_spacing": Live("sample", "leading"),
    "num_log_images": Live("log_images", 2),
    "compile": Live("speed", True),
    "channels_last": Live("speed", True),
    "schedule.kind": Live("loss", "linear"),
    "schedule.timesteps": Live("loss", 500),
    "schedule.beta_start": Live("loss", 0.001),
    "schedule.beta_end": Live("loss", 0.03),
    "schedule.zero_terminal_snr": Live("loss", True, context={"prediction": "v"}),
}

EDM_GRID = "EDM's sampling grid: a classifier learns at the levels draw_t gives"
NOISY_CLASSIFIER: dict[str, Entry] = {
    **FIRST_STAGE,
    "classifier._target_": Live(
        "structure", f"{TinyBackbone.__module__}.{TinyBackbone.__qualname__}"
    ),
    "classifier.model_channels": Live("structure", 8),
    "classifier.channel_mult": Live("structure", [1, 1]),
    "classifier.num_res_blocks": Live("structure", 2),
    "classifier.attention_resolutions": Live("structure", [1]),
    "classifier.num_head_channels": Live("loss", 4),  # same weights, other heads
    "classifier.dropout": Live("loss", 0.5),
    "num_classes": Live("structure", 10),
    "class_names": Elsewhere(
        "tests/models/test_noisy_classifier.py::"
        "test_the_checkpoint_loads_weights_only_with_its_classes_and_normalisation",
        "null takes the data's names at the start of training, saved in the checkpoint; names "
        "other than the data's are refused (test_classes_other_than_the_datas_are_refused)",
    ),
    # The LDM's process and schedule keys: the levels and noise a classifier is trained on.
    **{key: entry for key, entry in LDM.items() if key.startswith(("process.", "schedule."))},
    "process.sigma_min": Inert(EDM_GRID, "loss", 0.05, context=EDM),
    "process.sigma_max": Inert(EDM_GRID, "loss", 10.0, context=EDM),
    "process.rho": Inert(EDM_GRID, "loss", 3.0, context=EDM),
    "schedule.zero_terminal_snr": Live("loss", True),
    "scale_factor": Live("loss", 0.5),  # null: estimated at fit start
    "scale_factor_batches": Live("loss", 1),
    "latent_norm": Live("loss", "channel"),
    **optimizer_probes("torch.optim.Adam", scale_lr=False),
}



CONDITIONER: dict[str, Entry] = {
    "width": Live("structure", 8),
    **FIRST_STAGE,
    "image_encoder.channels": Live("structure", [8]),
    "embed_dim": Live("structure", 4),
    "init_temperature": Live("weights", 0.5),
    "max_logit_scale": Live("loss", 5.0),  # below exp(log(1/0.07)) = 14.3
    **optimizer_probes("torch.optim.Adam", scale_lr=False),
}
TEXT_ENCODER: dict[str, Entry] = {
    "text.vocab_size": Live("structure", 300),
    "text.context_length": Live("structure", 12),
    "text.layers": Live("structure", 2),
    "text.heads": Live("loss", 4),
    "text.mlp_ratio": Live("structure", 2.0),
    "text.dropout": Live("loss", 0.5),
}
ENCODER_TARGET = Elsewhere(
    "tests/models/test_parts.py::test_the_config_files_choose_the_encoder_class",
    "conditioner_text builds a CaptionEncoder, conditioner_class a ClassEncoder (another "
    "_target_ with other arguments: test_another_encoder_class_is_one_target_away)",
)
CONDITIONER_TEXT: dict[str, Entry] = {
    **CONDITIONER,
    "encoder._target_": ENCODER_TARGET,
    **{f"encoder.{key.removeprefix('text.')}": probe for key, probe in TEXT_ENCODER.items()},
}
CONDITIONER_CLASS: dict[str, Entry] = {
    **CONDITIONER,
    "encoder._target_": ENCODER_TARGET,
    "encoder.num_classes": Live("structure", 10),
    "encoder.num_tokens": Live("structure", 2),
}


def kind_switch(option: str) -> Entry:
    """``kind`` names the option; overriding it asks for the config group instead."""
    return Live("structure", option, raises=f"model/conditioning={option} instead")


UNCONDITIONAL: dict[str, Entry] = {"kind": kind_switch("class")}
CLASS_CONDITIONING: dict[str, Entry] = {
    "kind": kind_switch("text"),
    "num_classes": Live("structure", 10),
    "class_names": Elsewhere(
        "tests/test_class_names.py::test_classes_come_from_the_folder_and_travel_in_the_checkpoint",
        "names do not change the network: null takes the data's, which sampling accepts as labels",
    ),
    "class_route": Live("structure", "both"),
    "width": Live("structure", 16, context={"class_route": "context"}),
    "num_tokens": Live("structure", 2, context={"class_route": "context"}),
    "p_uncond": Live("loss", 0.5),
}
TEXT_CONDITIONING: dict[str, Entry] = {
    "kind": kind_switch("class"),
    "text_ckpt_path": Live("weights", "<clip>"),  # null (tiny): built here, trained jointly
    "freeze_text": Live("trainable", True, base=False, context={"text_ckpt_path": "<clip>"}),
    "trust_checkpoint": refused_unless_trusted("structure", {"text_ckpt_path": "<clip_foreign>"}),
    "width": Live("structure", 16),
    **TEXT_ENCODER,
    "p_uncond": Live("loss", 0.5),
}
PRETRAINED_TEXT_CONDITIONING: dict[str, Entry] = {
    "kind": kind_switch("text"),
    "text_pretrained": Live("weights", "<tiny_clip_other>"),
    "freeze_text": Live("trainable", False),
    "p_uncond": Live("loss", 0.5),
}


FINETUNE_TEST = "tests/models/test_finetune.py::"
FINETUNE_CONFIG = Elsewhere(
    FINETUNE_TEST + "test_the_experiment_config_builds_the_module_with_every_setting",
    "the key reaches the module built from +experiment=finetune (the LDM's own probes show "
    "what it changes there)",
)
FINETUNE: dict[str, Entry] = {
    "finetune.ckpt_path": Elsewhere(
        FINETUNE_TEST + "test_the_finetuned_model_starts_as_the_base_with_one_more_class",
        "the module starts as that base checkpoint (same predictions for the old classes)",
    ),
    "finetune.trust_checkpoint": Inert(
        "passed to read_checkpoint like every *.trust_checkpoint; a checkpoint the tests write "
        "names no code, so reading it safely or trusted gives the same module"
    ),
    "finetune.new_class": Elsewhere(
        FINETUNE_TEST + "test_a_lora_checkpoint_is_a_plain_ldm_that_samples_and_resumes",
        "the checkpoint has the new class and sample per_class writes samples/<new class>/",
    ),
    "finetune.instance_prompt": Elsewhere(
        FINETUNE_TEST + "test_a_text_base_learns_an_identifier_prompt",
        "the identifier prompt of a text-conditional base",
    ),
    **{key: FINETUNE_CONFIG for key in (
        "finetune.init_from", "finetune.prior.num", "finetune.prior.conditions",
        "finetune.prior.guidance_scale", "finetune.prior.seed", "finetune.prior.dir",
        "finetune.lora.rank", "finetune.lora.alpha", "finetune.lora.target_modules",
        "optimizer._target_", "optimizer.base_lr", "optimizer.scale_lr", "optimizer.betas",
        "optimizer.weight_decay", "optimizer.warmup_steps", "optimizer.schedule",
        "optimizer.min_lr_ratio", "sampling", "num_log_images", "compile", "channels_last",
    )},
    "finetune.embedding_lr": Elsewhere(
        FINETUNE_TEST + "test_the_new_row_trains_at_embedding_lr_and_the_original_rows_stay",
        "the new class's row takes Adam steps of embedding_lr, the other weights of base_lr",
    ),
    "finetune.prior.weight": Elsewhere(
        FINETUNE_TEST + "test_the_loss_is_the_instance_loss_plus_lambda_times_the_prior_loss",
        "lambda of DreamBooth eq. 2: loss = instance + weight * prior",
    ),
}


def spatial_kind_switch(option: str) -> Entry:
    return Live("structure", option, raises=f"does not choose the kind: use {SPATIAL}={option}")


# The condition of the first training batch changes the loss (masks, dropout: seeded draws).
SPATIAL_INPAINT: dict[str, Entry] = {
    "kind": spatial_kind_switch("upscale"),
    "p_uncond": Live("loss", 0.9),
}
SPATIAL_UPSCALE: dict[str, Entry] = {
    "kind": spatial_kind_switch("inpaint"),
    "factor": Live("loss", 2),  # an 8x8 low-resolution image, not 4x4
    "p_uncond": Live("loss", 0.9),
}
SPATIAL_SEMANTIC: dict[str, Entry] = {
    "kind": spatial_kind_switch("inpaint"),
    "num_classes": Live("structure", 3),
    "batch_key": Live("loss", "map", raises="builds its condition from the batch's 'map'"),
    "p_uncond": Live("loss", 0.9),
}


def keyed(config: str, entries: dict[str, Entry]) -> dict[str, Entry]:
    return {f"{config}:{key}": entry for key, entry in entries.items()}


TABLE: dict[str, Entry] = {
    **keyed("sample", SAMPLE),
    **keyed("evaluate", EVALUATE),
    **keyed("compare_report", COMPARE),
    **keyed("model/vq", VQ),
    **keyed("model/kl", KL),
    **keyed("model/ldm", LDM),
    **keyed("model/conditioning/none", UNCONDITIONAL),
    **keyed("model/conditioning/class", CLASS_CONDITIONING),
    **keyed("model/conditioning/text", TEXT_CONDITIONING),
    **keyed("model/conditioning/pretrained_text", PRETRAINED_TEXT_CONDITIONING),
    **keyed(f"{SPATIAL}/inpaint", SPATIAL_INPAINT),
    **keyed(f"{SPATIAL}/upscale", SPATIAL_UPSCALE),
    **keyed(f"{SPATIAL}/semantic", SPATIAL_SEMANTIC),
    **keyed("model/conditioner_text", CONDITIONER_TEXT),
    **keyed("model/conditioner_class", CONDITIONER_CLASS),
    **keyed("model/noisy_classifier", NOISY_CLASSIFIER),
    **keyed("model/finetune", FINETUNE),
}


# ---------------------------------------------------------------------------- enumeration
def flat_keys(node: Any, prefix: str = "") -> set[str]:
    """Dotted keys of the leaves of a config (lists and empty dicts are leaves)."""
    if OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=False)
    keys: set[str] = set()
    for key, value in node.items():
        if key in SKIPPED or (not prefix and key in SKIPPED_TOP):
            continue
        if isinstance(value, dict) and value:
            keys |= flat_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def model_names() -> list[str]:
    return sorted(path.stem for path in (CONF / "model").glob("*.yaml"))


def group_variants(name: str) -> list[list[str]]:
    """Overrides giving every option of the groups a model config pulls in."""
    # defaults: /scheduler@schedule, process, and the LDM's sampler (model.sampling.sampler) and
    # backbone (model.unet)
    processes = [
        *([f"scheduler@model.schedule={option}"] for option in group_options("scheduler")),
        *([f"model/process={option}"] for option in group_options("model/process")),
    ]
    if name == "ldm":
        return [*processes,
                *([f"model/sampler={option}"] for option in group_options("model/sampler")),
                *([f"model/backbone={option}"] for option in group_options("model/backbone"))]
    return processes if name == "noisy_classifier" else [[]]


def group_options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def conditioning_options() -> list[str]:
    return group_options(CONDITIONING)


def config_keys(tmp_path: Path) -> set[str]:
    keys = set()
    for config in ENTRY_CONFIGS:
        keys |= {f"{config}:{k}" for k in flat_keys(OmegaConf.load(CONF / f"{config}.yaml"))}
    for name in model_names():
        for overrides in group_variants(name):
            model = compose_config([f"model={name}", *overrides], tmp_path).model
            # The conditioning options are configs of their own (below).
            keys |= {f"model/{name}:{k}" for k in flat_keys(model)
                     if not k.startswith("conditioning.")}
    for option in conditioning_options():
        model = compose_config(["model=ldm", f"{CONDITIONING}={option}"], tmp_path).model
        keys |= {f"{CONDITIONING}/{option}:{k}" for k in flat_keys(model.conditioning)}
    for option in group_options(SPATIAL):
        model = compose_config(["model=ldm", f"{SPATIAL}={option}"], tmp_path).model
        keys |= {f"{SPATIAL}/{option}:{k}" for k in flat_keys(model.spatial)}
    return keys


def test_every_config_key_has_exactly_one_entry(tmp_path: Path) -> None:
    found = config_keys(tmp_path)
    missing = sorted(found - TABLE.keys())
    assert not missing, (
        f"config keys without a liveness entry: {missing}. Add each to TABLE in "
        "tests/test_config_liveness.py: a Live probe (changing it changes the samples, the loss, "
        "the module or a written file), an Inert reason, or the Elsewhere test that asserts "
        "its effect."
    )
    stale = sorted(TABLE.keys() - found)
    assert not stale, f"TABLE names keys that are no longer in the configs; remove them: {stale}"


def test_entries_name_existing_tests_and_observations() -> None:
    for key, entry in TABLE.items():
        config = key.split(":", 1)[0]
        if isinstance(entry, Elsewhere):
            path, name = entry.test.split("::")
            module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
            assert name.startswith("test_") and callable(getattr(module, name, None)), (
                f"{key} is said to be tested by {entry.test}, which does not exist"
            )
        elif isinstance(entry, Inert):
            assert entry.reason, key
        observe = getattr(entry, "observe", None)
        if observe is not None:
            assert observe in OBSERVERS[family(config)], f"{key}: no observation {observe!r}"


# ---------------------------------------------------------------------------- building
TINY_AE = [
    "data.image_size=32",  # LPIPS' alex and squeeze backbones need more than 16 px
    *(o for o in TINY_AUTOENCODER if o.startswith("model.")),
    "model.loss.perceptual_weight=0",
    "model.perceptual.net=squeeze",
    "model.perceptual.pretrained_backbone=false",
]
TINY_CONDITIONER = ["data.image_size=16", *TINY_CLIP, "model.first_stage.identity=true"]
TINY = {
    "vq": TINY_AE,
    "kl": TINY_AE,
    "ldm": [
        "data.image_size=16",
        *(o for o in TINY_LDM if o.startswith("model.")),
        "model.first_stage.identity=true",
    ],
    "conditioner_text": TINY_CONDITIONER,
    "conditioner_class": [
        *(o for o in TINY_CONDITIONER if not o.startswith("model.encoder.")),
        "model.encoder.num_classes=18",
    ],
    "noisy_classifier": [
        "data.image_size=16", "model.first_stage.identity=true", "model.num_classes=18",
        "model.classifier.model_channels=16", "model.classifier.channel_mult=[1,2]",
        "model.classifier.num_res_blocks=1", "model.classifier.attention_resolutions=[2]",
        "model.classifier.num_head_channels=8",
    ],
    "sample": ["num_samples=3", "batch_size=2"],
    "evaluate": [
        f"feature_extractor={EXTRACTOR}", "progress=false", "protocol.num_samples=4",
        "batch_size=3",
        *TINY_DATA,
    ],
    "compare_report": [f"feature_extractor={EXTRACTOR}", "progress=false", "per_class=1",
                       "num_samples=4", "batch_size=9", "steps=2"],
}
# A conditioning option is built into the tiny LDM (a text encoder built here, trained jointly).
TINY_CONDITIONING = {
    "none": [],
    "class": ["model.conditioning.num_classes=18", "model.conditioning.width=8"],
    "text": [
        "model.conditioning.text_ckpt_path=null", "model.conditioning.width=8",
        *(f"model.conditioning.text.{key}={value}" for key, value in TEXT.items()),
    ],
    "pretrained_text": [],
}
# Settings every probe of an entry point starts from.
BASE_SETTINGS = {
    "sample": {"ckpt_path": "<ldm>"},
    "evaluate": {"ckpt_path": "<ldm>", "stats_dir": "<run>/stats"},
    "compare_report": {"runs": ["<compare_runs>"], "stats_dir": "<run>/stats"},
    f"{CONDITIONING}/pretrained_text": {"text_pretrained": "<tiny_clip>"},
}
FAMILIES = {
    "vq": "autoencoder",
    "kl": "autoencoder",
    "ldm": "ldm",
    "conditioner_text": "conditioner",
    "conditioner_class": "conditioner",
    "noisy_classifier": "classifier",
}


def family(config: str) -> str:
    if config in ENTRY_CONFIGS:
        return config
    if config.startswith((CONDITIONING, SPATIAL)):
        return "ldm"
    return FAMILIES[config.split("/", 1)[1]]


def overrides_of(config: str) -> list[str]:
    """What composes the tiny ``config``: an entry point's, a model's, or the LDM with one
    conditioning option."""
    if config in ENTRY_CONFIGS:
        return TINY[config]
    if config.startswith(CONDITIONING):
        option = config.rsplit("/", 1)[1]
        return ["model=ldm", f"{CONDITIONING}={option}", *TINY["ldm"], *TINY_CONDITIONING[option]]
    if config.startswith(SPATIAL):
        return ["model=ldm", f"{SPATIAL}={config.rsplit('/', 1)[1]}", *TINY["ldm"]]
    name = config.split("/")[-1]
    return [f"model={name}", *TINY[name]]


_COMPOSED: dict[str, DictConfig] = {}


def base_config(config: str, tmp_path: Path) -> DictConfig:
    if config not in _COMPOSED:
        _COMPOSED[config] = compose_config(
            overrides_of(config), tmp_path,
            config_name=config if config in ENTRY_CONFIGS else "train",
        )
    return copy.deepcopy(_COMPOSED[config])


def apply(node: DictConfig, settings: Mapping[str, Any]) -> None:
    for key, value in settings.items():
        OmegaConf.update(node, key, value, merge=False, force_add=True)


FIT_BATCHES = list(DataLoader(ShapesDataset(16, 16), batch_size=4))
BATCH = FIT_BATCHES[0]
AE_BATCH = next(iter(DataLoader(ShapesDataset(4, 32), batch_size=4)))
CAPTIONED = ShapesDataset(100, 8)  # the captions of CAPTIONS
TRAINING_STEPS = 400


def stand_in_data(module) -> SimpleNamespace:
    """The data source a module is connected to (ldm_lightning.models.connect)."""
    return SimpleNamespace(
        batch_size=4,
        captions=lambda split: CAPTIONED.captions(),  # a text encoder learns its tokenizer
        latent_stats=lambda num_batches: LatentStats.of(
            module.latent_encoder().encode(batch["image"]) for batch in FIT_BATCHES[:num_batches]
        ),
    )


def stand_in_trainer() -> SimpleNamespace:
    """What the modules read from their trainer at fit start and in configure_optimizers."""
    return SimpleNamespace(
        num_devices=1,
        num_nodes=1,
        accumulate_grad_batches=1,
        estimated_stepping_batches=TRAINING_STEPS,
        global_rank=0,
        strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj),
    )


def build_model(config: str, settings: Mapping[str, Any], tmp_path: Path):
    cfg = base_config(config, tmp_path)
    apply(cfg.model, settings)
    torch.manual_seed(0)
    module = hydra.utils.instantiate(cfg.model)
    module.trainer = stand_in_trainer()
    module.use_data(stand_in_data(module))
    torch.manual_seed(0)
    if family(config) == "ldm":
        # Zero-initialised output convs make an untrained UNet predict 0 whatever its settings.
        randomise_zero_parameters(module.unet)
        module.on_fit_start()  # estimates the latent scale factor when it is null
    elif family(config) == "classifier":
        randomise_zero_parameters(module.classifier)  # its zero-initialised head: uniform
        module.on_fit_start()
    elif isinstance(getattr(module, "encoder", None), CaptionEncoder):
        module.encoder.fit_tokenizer(CAPTIONS)
    return module


# ---------------------------------------------------------------------------- observations
def structure(module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items() if torch.is_tensor(v)}


def weights(module) -> dict[str, Any]:
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in module.state_dict().items()}


def trainable(module) -> list[str]:
    """The parameters the optimizer would train (a frozen encoder has none)."""
    return [name for name, p in module.named_parameters() if p.requires_grad]


def optimizer(module) -> list[Any]:
    """Per optimizer: its class, betas, weight decay and the rate every 10 steps of training."""
    configured = module.configure_optimizers()
    if isinstance(configured, dict):
        pairs = [(configured["optimizer"], configured["lr_scheduler"]["scheduler"])]
    else:
        pairs = [(opt, sched["scheduler"]) for opt, sched in zip(*configured)]
    trace = []
    for opt, scheduler in pairs:
        group = opt.param_groups[0]
        steps = range(0, TRAINING_STEPS, 10)
        rates = [group["initial_lr"] * scheduler.lr_lambdas[0](step) for step in steps]
        trace.append([type(opt).__name__, list(group["betas"]), group["weight_decay"], rates])
    return trace


def speed(module) -> dict[str, Any]:
    """Which nets are compiled and which 4-D weights are stored channels_last."""
    module.configure_model()
    return {
        name: (
            getattr(child, "_compiled_call_impl", None) is not None,
            [p.is_contiguous() for p in child.parameters() if p.ndim == 4],
        )
        for name, child in module.named_children()
    }


def log_images(batch: dict[str, Any]) -> Callable[[Any], dict[str, Any]]:
    """The shapes of the grids the image logger gets for ``batch``."""

    def observe(module) -> dict[str, Any]:
        return {name: tuple(grid.shape) for name, (grid, _) in module.log_images(batch).items()}

    return observe


def autoencoder_loss(module) -> torch.Tensor:
    """Generator and discriminator losses of the first training batch."""
    module.train()
    x = AE_BATCH["image"]
    x_hat, reg, _ = module(x)
    step = int(module.train_batches)
    g_loss, _ = module.loss.generator_loss(x, x_hat, reg, step, module.decoder.last_layer)
    d_loss, _ = module.loss.discriminator_loss(x, x_hat, step)
    return torch.stack([g_loss, d_loss]).detach()


def codebook(module) -> torch.Tensor:
    """The codebook after one training forward (EMA and dead-code restarts move it)."""
    module.train()
    module(AE_BATCH["image"])
    return module.quantize.embedding.weight.detach().clone()


def ldm_loss_tensor(module) -> torch.Tensor:
    module.train()
    z0 = module.latents(BATCH)
    cond = module.conditioning(BATCH, train=True)
    return module.diffusion_loss(z0, cond, torch.Generator().manual_seed(0))


def ldm_sample(module) -> torch.Tensor:
    return module.eval().sample(n=2, seed=0)


def recompute(module) -> int:
    """UNet submodule calls in one training step: gradient checkpointing reruns them."""
    calls = []
    handles = [m.register_forward_hook(lambda *_: calls.append(1)) for m in module.unet.modules()]
    ldm_loss_tensor(module).backward()
    for handle in handles:
        handle.remove()
    return len(calls)


def classifier_loss(module) -> torch.Tensor:
    """The cross-entropy of the first training batch at levels and noise of a fixed seed."""
    module.train()
    logits, _ = module.noisy_logits(module.latents(BATCH), torch.Generator().manual_seed(0))
    return F.cross_entropy(logits, BATCH["label"]).detach()


def conditioner_loss(module) -> torch.Tensor:
    module.train()
    image, text, groups = module.embed(BATCH)
    return contrastive_loss(image, text, module.scale(), groups).detach()


COMMON: dict[str, Callable[[Any], Any]] = {
    "structure": structure,
    "weights": weights,
    "optimizer": optimizer,
}
MODEL_OBSERVERS: dict[str, dict[str, Callable[[Any], Any]]] = {
    "autoencoder": {
        **COMMON, "loss": autoencoder_loss, "codebook": codebook,
        "log_images": log_images(AE_BATCH),
        "speed": speed,
    },
    "ldm": {
        **COMMON, "loss": lambda m: ldm_loss_tensor(m).detach(), "sample": ldm_sample,
        "trainable": trainable,
        "recompute": recompute, "log_images": log_images(BATCH), "speed": speed,
    },
    "conditioner": {**COMMON, "loss": conditioner_loss},
    "classifier": {**COMMON, "loss": classifier_loss},
}


def files_under(root: Path, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """Every file under ``root``: images by content, other files by name."""
    return {
        str(path.relative_to(root)): (
            hashlib.sha256(path.read_bytes()).hexdigest() if path.suffix == ".png" else "present"
        )
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name not in exclude
    }


class _MovedToMeta(Exception):
    pass


def devices_moved_to(call: Callable[[], Any]) -> list[str]:
    """The devices ``call`` moves modules to; a move to ``meta`` is recorded and stops it."""
    moved: list[str] = []
    original = torch.nn.Module.to

    def spy(self, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None:
            moved.append(device.type)
            if device.type == "meta":
                raise _MovedToMeta
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.Module, "to", spy)
        with contextlib.suppress(_MovedToMeta):
            call()
    return moved


# What metrics.json repeats from the config rather than measures.
ECHOED = ("ckpt_path", "data_config", "feature_extractor", "sampling", "protocol")


def report(cfg: DictConfig, run: Path) -> dict[str, Any]:
    written = evaluate(cfg)
    return {
        "report": {k: v for k, v in written.items() if k not in ECHOED},
        "files": files_under(run, exclude=("metrics.json",)),
    }


def progress_bar_drawn(call: Callable[[], Any]) -> bool:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        call()
    return bool(re.search(r"\d+%\|", stderr.getvalue()))


# What compare.json repeats from the config, and the one number that is a measured time.
COMPARE_ECHOED = ("settings", "command", "feature_extractor")


def compare_report(cfg: DictConfig, run: Path) -> dict[str, Any]:
    written = compare(cfg)
    runs = [
        {**entry, "path": None,
         "checkpoints": [{k: v for k, v in row.items() if k != "sampling_seconds"}
                         for row in entry["checkpoints"]]}
        for entry in written["runs"]
    ]
    return {
        "report": {**{k: v for k, v in written.items() if k not in COMPARE_ECHOED}, "runs": runs},
        "files": files_under(run, exclude=("compare.json", "compare.md")),
    }


def run_dir(config: str, settings: Mapping[str, Any]) -> str:
    """The directory the entry point's run writes into, without its time stamp."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(config_name=config, return_hydra_config=True)
    apply(cfg, settings)
    return str(Path(OmegaConf.select(cfg, "hydra.run.dir")).parent)


ENTRY_OBSERVERS: dict[str, dict[str, Callable[[DictConfig, Path], Any]]] = {
    "sample": {
        # config.yaml repeats every key; the images are what the keys must change.
        "samples": lambda cfg, run: (sample_run(cfg), files_under(run, ("config.yaml",)))[1],
        "devices": lambda cfg, run: devices_moved_to(lambda: sample_run(cfg)),
        "run_dir": None,  # needs Hydra's own config: see run_dir()
    },
    "evaluate": {
        "report": report,
        "progress": lambda cfg, run: progress_bar_drawn(lambda: evaluate(cfg)),
        "devices": lambda cfg, run: devices_moved_to(lambda: evaluate(cfg)),
        "run_dir": None,
    },
    "compare_report": {
        "report": compare_report,
        "progress": lambda cfg, run: progress_bar_drawn(lambda: compare(cfg)),
        "devices": lambda cfg, run: devices_moved_to(lambda: compare(cfg)),
        "run_dir": None,
    },
}
OBSERVERS = {**MODEL_OBSERVERS, **ENTRY_OBSERVERS}


# ---------------------------------------------------------------------------- probing
def resolve(value: Any, names: Mapping[str, str]) -> Any:
    """``value`` with the ``<name>`` placeholders of checkpoint and run paths filled in."""
    if isinstance(value, str):
        for name, path in names.items():
            value = value.replace(name, str(path))
        return value
    if isinstance(value, list):
        return [resolve(v, names) for v in value]
    return value


def observe(config: str, what: str, settings: Mapping[str, Any], env: dict[str, Any]) -> Any:
    run = env["tmp"].mktemp("run")
    settings = {k: resolve(v, {**env["files"], "<run>": run}) for k, v in settings.items()}
    torch.manual_seed(0)
    if config in ENTRY_CONFIGS:
        if what == "run_dir":
            return run_dir(config, settings)
        cfg = base_config(config, env["tmp"].getbasetemp())
        with open_dict(cfg):
            cfg.paths.output_dir = str(run)
        apply(cfg, settings)
        return ENTRY_OBSERVERS[config][what](cfg, run)
    module = build_model(config, settings, env["tmp"].getbasetemp())
    torch.manual_seed(0)
    return MODEL_OBSERVERS[family(config)][what](module)


def same(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same, a, b))
    return a == b or (a != a and b != b)  # NaN equals NaN here


_BASELINES: dict[str, Any] = {}


def baseline(config: str, what: str, settings: Mapping[str, Any], env: dict[str, Any]) -> Any:
    """The observation at the base settings, checked to be reproducible (taken twice)."""
    key = repr((config, what, sorted(settings.items())))
    if key not in _BASELINES:
        first, second = (observe(config, what, settings, env) for _ in range(2))
        assert same(first, second), (
            f"{config} {what} differs between two identical builds: a probe cannot tell a "
            "change of a key from this noise; seed what it draws"
        )
        _BASELINES[key] = first
    return _BASELINES[key]


@pytest.fixture(scope="module")
def stage_files(checkpoints, tmp_path_factory) -> dict[str, Path]:  # noqa: F811 - the fixture
    """Checkpoints the probes point at: the trained tiny ones, copies with other weights or
    with a foreign pickle global, untrained conditional LDMs and a text conditioner.

    ``<ldm>`` is the trained LDM with noise on its weights: trained for four steps, its
    zero-initialised output conv still predicts eps ~ 0, and then DDIM's updates telescope to
    ``x_T / sqrt(abar_T)`` whatever the number of steps.

    The conditional LDMs are untrained (random UNet weights): guidance, labels and prompts must
    move their samples by more than the 8-bit rounding of the written PNGs.
    """
    root = tmp_path_factory.mktemp("stages")
    torch.manual_seed(0)
    class_ldm = tiny_ldm(conditioning_config("class", num_classes=18, class_route="both", width=8))
    text_ldm = tiny_ldm(conditioning_config("text", width=8, text=TEXT))
    text_ldm.conditioner.text.fit_tokenizer(CAPTIONS)
    clip = ConditionerModule(encoder={"_target_": ENCODERS["text"], **TEXT}, width=16,
                             first_stage={"identity": True}, embed_dim=8,
                             image_encoder={"channels": [8]})
    clip.encoder.fit_tokenizer(CAPTIONS)
    clip_ckpt = write_checkpoint(clip, root / "clip.ckpt")
    classifier = classifier_of(checkpoints["ldm"], checkpoints["ae"])
    classifier_ckpt = write_checkpoint(classifier, root / "classifier.ckpt")
    class_ckpt = write_checkpoint(class_ldm, root / "class_ldm.ckpt")
    other_class = perturbed_copy(class_ckpt, root / "class_ldm_other.ckpt")
    runs = root / "compare_runs"
    compare_run(class_ckpt, runs / "0", image_size=8, variant="a")
    compare_run(other_class, runs / "1", image_size=8, variant="b")
    return {
        "<ldm>": perturbed_copy(checkpoints["ldm"], root / "ldm.ckpt", seed=0),
        "<ldm_perturbed>": perturbed_copy(checkpoints["ldm"], root / "ldm_perturbed.ckpt", seed=1),
        "<ae>": checkpoints["ae"],
        "<ae_perturbed>": perturbed_copy(checkpoints["ae"], root / "ae_perturbed.ckpt"),
        "<class_ldm>": class_ckpt,
        "<text_ldm>": write_checkpoint(text_ldm, root / "text_ldm.ckpt"),
        "<ldm_foreign>": foreign_copy(checkpoints["ldm"], root / "ldm_foreign.ckpt"),
        "<ae_foreign>": foreign_copy(checkpoints["ae"], root / "ae_foreign.ckpt"),
        "<clip>": clip_ckpt,
        "<clip_foreign>": foreign_copy(clip_ckpt, root / "clip_foreign.ckpt"),
        "<tiny_clip>": write_tiny_clip(root / "tiny_clip"),
        "<tiny_clip_other>": perturbed_clip(root / "tiny_clip", root / "tiny_clip_other"),
        "<tiny_clip_model>": write_tiny_clip_model(root / "tiny_clip_model"),
        "<tiny_clip_model_other>": write_tiny_clip_model(root / "tiny_clip_model_other", seed=1),
        "<classifier>": classifier_ckpt,
        "<classifier_other>": perturbed_copy(classifier_ckpt, root / "classifier_other.ckpt"),
        "<compare_runs>": runs,
        "<init_png>": wide_png(root / "init.png")[0],
        "<compare_uncond>": compare_run(checkpoints["ldm"], root / "compare_uncond", 16, "u"),
        "<compare_foreign>": compare_run(class_ckpt, root / "compare_foreign", 8, "f",
                                         foreign=True),
    }


def classifier_of(ldm_ckpt: Path, ae_ckpt: Path) -> NoisyClassifierModule:
    """An untrained noisy classifier of the latent space of the LDM of ``ldm_ckpt`` (its
    autoencoder ``ae_ckpt``, latent scale and process), with random weights: its
    zero-initialised head would not guide."""
    ldm = read_checkpoint(ldm_ckpt)
    hparams = ldm["hyper_parameters"]
    classifier = NoisyClassifierModule(
        classifier={"model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                    "attention_resolutions": [2], "num_head_channels": 8},
        first_stage={"ckpt_path": str(ae_ckpt)}, num_classes=18,
        process=hparams["process"], schedule=hparams["schedule"], scale_factor=ldm["scale_factor"],
    )
    return randomise_zero_parameters(classifier)


def compare_run(ckpt: Path, run: Path, image_size: int, variant: str,
                foreign: bool = False) -> Path:
    """A run directory as +experiment=shapes_compare leaves it: its config.yaml (tiny shapes at
    ``image_size``), .hydra/overrides.yaml and one time-stamped copy of the stage ``ckpt`` (with
    a pickle global outside torch's allowlist if ``foreign``)."""
    checkpoint = stage_only(torch.load(ckpt, map_location="cpu", weights_only=True))
    checkpoint[TIME_KEY] = {"train_seconds": 1.0, "wall_seconds": 1.5, "global_step": 1, "epoch": 0}
    if foreign:
        checkpoint["foreign"] = Fraction(1, 3)
    (run / "checkpoints" / "timed").mkdir(parents=True)
    torch.save(checkpoint, run / "checkpoints" / "timed" / "t000001s-step0000001.ckpt")
    data = {"_target_": "ldm_lightning.data.shapes.ShapesDataModule", "image_size": image_size,
            "num_train": 16, "num_val": 8, "num_test": 8, "batch_size": 4}
    OmegaConf.save(OmegaConf.create({"data": data}), run / "config.yaml")
    (run / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create([f"compare={variant}"]), run / ".hydra" / "overrides.yaml")
    return run


def perturbed_clip(src: Path, dst: Path, std: float = 0.05) -> Path:
    """A copy of the transformers CLIP folder ``src`` with Gaussian noise on its weights."""
    shutil.copytree(src, dst)
    model = transformers.CLIPTextModel.from_pretrained(dst)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(std * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(dst)
    return dst


def probe_env(config: str, settings: Mapping[str, Any], request) -> dict[str, Any]:
    uses_files = config in ENTRY_CONFIGS or any(
        isinstance(v, str) and v.startswith("<") for v in settings.values()
    )
    files = request.getfixturevalue("stage_files") if uses_files else {}
    return {"tmp": request.getfixturevalue("tmp_path_factory"), "files": files}


def settings_of(key: str, entry: Live | Inert) -> tuple[str, dict[str, Any], dict[str, Any]]:
    config, dotted = key.split(":", 1)
    base = {**BASE_SETTINGS.get(config, {}), **getattr(entry, "context", {})}
    if getattr(entry, "base", KEEP) is not KEEP:
        base[dotted] = entry.base
    changed = {**base, dotted: entry.value}
    if config.startswith(CONDITIONING):  # its keys are those of model.conditioning
        base, changed = ({f"conditioning.{k}": v for k, v in d.items()} for d in (base, changed))
    if config.startswith(SPATIAL):  # those of model.spatial
        base, changed = ({f"spatial.{k}": v for k, v in d.items()} for d in (base, changed))
    return config, base, changed


LIVE = [key for key, entry in TABLE.items() if isinstance(entry, Live)]
CHECKED_INERT = [key for key, e in TABLE.items() if isinstance(e, Inert) and e.observe]


@pytest.mark.parametrize("key", LIVE)
def test_changing_a_live_key_changes_what_it_claims(key: str, request) -> None:
    entry = TABLE[key]
    for name in entry.fixtures:
        request.getfixturevalue(name)
    config, base_settings, changed_settings = settings_of(key, entry)
    env = probe_env(config, changed_settings, request)
    base = baseline(config, entry.observe, base_settings, env)
    if entry.raises:
        with pytest.raises(Exception, match=entry.raises):
            observe(config, entry.observe, changed_settings, env)
        return
    changed = observe(config, entry.observe, changed_settings, env)
    assert not same(base, changed), (
        f"{key}: changing it to {entry.value!r} (from {entry.base!r}, with {dict(entry.context)}) "
        f"left the {entry.observe} unchanged: the key is dead, or its probe in TABLE is wrong"
    )


@pytest.mark.parametrize("key", CHECKED_INERT)
def test_an_inert_key_changes_nothing(key: str, request) -> None:
    entry = TABLE[key]
    config, base_settings, changed_settings = settings_of(key, entry)
    env = probe_env(config, changed_settings, request)
    base = baseline(config, entry.observe, base_settings, env)
    changed = observe(config, entry.observe, changed_settings, env)
    assert same(base, changed), (
        f"{key} is listed as inert ({entry.reason}), but changing it to {entry.value!r} changed "
        f"the {entry.observe}: make it a Live entry"
    )
