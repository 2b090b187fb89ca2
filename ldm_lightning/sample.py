"""Sample a trained latent diffusion checkpoint: ``python -m ldm_lightning.sample ckpt_path=...``.

Writes ``grid.png`` and ``samples/<index>.png`` into the run directory. Batch ``b`` uses seed
``seed + b``, so the same command gives the same images, on any device.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
import torchvision
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ldm_lightning.models import LatentDiffusionModule
from ldm_lightning.models.checkpoints import load_stage
from ldm_lightning.utils.cycling import cycle_to
from ldm_lightning.utils.device import resolve_device
from ldm_lightning.utils.images import save_grid

log = logging.getLogger(__name__)


def batch_conditions(
    num_samples: int,
    batch_size: int,
    labels: Sequence[int] | None = None,
    prompts: Sequence[str] | None = None,
) -> Iterator[dict[str, list[Any]]]:
    """Per-batch ``labels``/``prompts`` inputs, each list cycled to ``num_samples`` first."""
    condition = {"labels": cycle_to(labels, num_samples), "prompts": cycle_to(prompts, num_samples)}
    for start in range(0, num_samples, batch_size):
        stop = min(start + batch_size, num_samples)
        yield {k: v[start:stop] for k, v in condition.items() if v is not None}


@torch.no_grad()
def generate(
    module: pl.LightningModule,
    num_samples: int,
    batch_size: int,
    conditions: Iterator[dict[str, Any]] | None = None,
    seed: int = 0,
    progress: bool = False,
    **sampling: Any,
) -> Iterator[torch.Tensor]:
    """Batches of samples ``[b, 3, H, W]`` in [-1, 1]; batch ``i`` uses seed ``seed + i``.

    ``conditions`` yields one dict of ``labels``/``prompts`` per batch (cut to the batch);
    ``sampling``: ``sampler``, ``steps``, ``eta``, ``guidance_scale``, ... of
    :meth:`LatentDiffusionModule.sample` (None: the checkpoint's defaults).
    """
    conditions = conditions if conditions is not None else itertools.repeat({})
    starts = range(0, num_samples, batch_size)
    for index, start in enumerate(tqdm(starts, desc="sampling", disable=not progress)):
        n = min(batch_size, num_samples - start)
        condition = {k: v[:n] for k, v in next(conditions).items()}
        yield module.sample(n=n, seed=seed + index, **sampling, **condition)


def write_samples(images: torch.Tensor, out_dir: str | Path, nrow: int | None = None) -> Path:
    """``grid.png`` and ``samples/00000.png, ...`` under ``out_dir``; returns the grid path."""
    out_dir = Path(out_dir)
    (out_dir / "samples").mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        torchvision.utils.save_image((image + 1) / 2, out_dir / "samples" / f"{index:05d}.png")
    return save_grid(images, out_dir / "grid.png", nrow)


def run(cfg: DictConfig) -> Path:
    model = load_stage(
        LatentDiffusionModule, cfg.ckpt_path, "latent_diffusion", trust=cfg.trust_checkpoint
    )
    model.to(resolve_device(cfg.device))

    def optional(value: Any) -> Any:
        return OmegaConf.to_object(value) if value is not None else None

    conditions = batch_conditions(
        cfg.num_samples, cfg.batch_size, optional(cfg.labels), optional(cfg.prompts)
    )
    batches = generate(
        model,
        cfg.num_samples,
        cfg.batch_size,
        conditions,
        seed=cfg.seed,
        progress=True,
        sampler=cfg.sampler,
        steps=cfg.steps,
        eta=cfg.eta,
        timestep_spacing=cfg.timestep_spacing,
        guidance_scale=cfg.guidance_scale,
        guidance_rescale=cfg.guidance_rescale,
        negative_prompts=optional(cfg.negative_prompts),
        unconditional=cfg.unconditional,
    )
    images = torch.cat([batch.cpu() for batch in batches])
    grid = write_samples(images, cfg.paths.output_dir, cfg.grid_nrow)
    OmegaConf.save(cfg, Path(cfg.paths.output_dir) / "config.yaml", resolve=True)
    log.info("Wrote %d samples and %s", len(images), grid)
    return grid


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
