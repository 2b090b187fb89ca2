"""Sample a trained latent diffusion checkpoint: ``python -m ldm_lightning.sample ckpt_path=...``.

Writes ``grid.png`` and ``samples/<index>.png`` into the run directory; with ``per_class=N``,
N samples of every class (of a class-conditional model, or of the ``classifier_ckpt`` that guides
it) in ``samples/<class name>/<index>.png`` and one grid row per class. ``task=inpaint | upscale |
semantic image=<png> [mask=<png>]`` samples a model with that spatial condition
(:mod:`ldm_lightning.sample_tasks`).
Batch ``b`` uses seed ``seed + b``, so the same command gives the same images, on any device.
``image_size=<px>`` samples another canvas than the training size (LDM sec. 4.3.2);
``init_image=<png> strength=<0..1>`` edits an image (SDEdit, Meng et al. 2022).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ldm_lightning.models import LatentDiffusionModule
from ldm_lightning.models.checkpoints import load_stage
from ldm_lightning.sample_tasks import finish_task, task_inputs
from ldm_lightning.sampling import (
    batch_conditions,
    generate,
    guidance_classifier,
    load_init_image,
    per_class_labels,
    sampling_options,
    write_samples,
)
from ldm_lightning.utils.device import resolve_device

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> Path:
    model = load_stage(
        LatentDiffusionModule, cfg.ckpt_path, "latent_diffusion", trust=cfg.trust_checkpoint
    )
    device = resolve_device(cfg.device)
    model.to(device)

    def optional(value: Any) -> Any:
        return OmegaConf.to_object(value) if value is not None else None

    spatial = task_inputs(model, cfg.task, cfg.image, cfg.mask)
    classifier = guidance_classifier(cfg, device)
    labels, num_samples, folders = optional(cfg.labels), cfg.num_samples, None
    if cfg.per_class:
        labels, folders = per_class_labels(model, cfg.per_class, labels, classifier)
        num_samples = len(labels)
    conditions = batch_conditions(num_samples, cfg.batch_size, labels, optional(cfg.prompts))
    edit = {}
    if cfg.init_image is not None:
        size = cfg.image_size or model.hparams.image_size
        edit = {"init_images": load_init_image(cfg.init_image, size), "strength": cfg.strength}
    batches = generate(
        model,
        num_samples,
        cfg.batch_size,
        conditions,
        seed=cfg.seed,
        progress=True,
        **sampling_options(cfg),
        negative_prompts=optional(cfg.negative_prompts),
        unconditional=cfg.unconditional,
        classifier=classifier,
        image_size=cfg.image_size,
        spatial=spatial,
        **edit,
    )
    images = finish_task(torch.cat([batch.cpu() for batch in batches]), spatial)
    nrow = cfg.grid_nrow or (cfg.per_class if cfg.per_class else None)
    grid = write_samples(images, cfg.paths.output_dir, nrow, folders)
    OmegaConf.save(cfg, Path(cfg.paths.output_dir) / "config.yaml", resolve=True)
    log.info("Wrote %d samples and %s", len(images), grid)
    return grid


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
