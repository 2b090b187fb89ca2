"""Sample a trained latent diffusion checkpoint: ``python -m ldm_lightning.sample ckpt_path=...``.

Writes ``grid.png`` and ``samples/<index>.png`` into the run directory. Batch ``b`` uses seed
``seed + b``, so the same command gives the same images, on any device.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
import torchvision
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ldm_lightning.callbacks.image_logger import save_grid
from ldm_lightning.models import LatentDiffusionModule
from ldm_lightning.models.checkpoints import load_stage

log = logging.getLogger(__name__)


def cycle_to(values: Sequence[Any] | None, n: int) -> list[Any] | None:
    """Repeat ``values`` until there are ``n`` of them (None stays None)."""
    if values is None:
        return None
    values = list(values)
    if not values:
        raise ValueError("labels/prompts is an empty list; pass at least one, or null")
    return [values[i % len(values)] for i in range(n)]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def generate(
    model: LatentDiffusionModule,
    num_samples: int,
    batch_size: int,
    seed: int,
    labels: Sequence[int] | None = None,
    prompts: Sequence[str] | None = None,
    progress: bool = True,
    **sample_kwargs: Any,
) -> torch.Tensor:
    """``num_samples`` images ``[N, 3, H, W]`` in [-1, 1], ``batch_size`` at a time."""
    labels = cycle_to(labels, num_samples)
    prompts = cycle_to(prompts, num_samples)
    batches = []
    starts = range(0, num_samples, batch_size)
    for index, start in enumerate(tqdm(starts, desc="sampling", disable=not progress)):
        stop = min(start + batch_size, num_samples)
        batches.append(
            model.sample(
                n=stop - start,
                seed=seed + index,
                labels=labels[start:stop] if labels is not None else None,
                prompts=prompts[start:stop] if prompts is not None else None,
                **sample_kwargs,
            ).cpu()
        )
    return torch.cat(batches)


def write_samples(images: torch.Tensor, out_dir: str | Path, nrow: int | None = None) -> Path:
    """``grid.png`` and ``samples/00000.png, ...`` under ``out_dir``; returns the grid path."""
    out_dir = Path(out_dir)
    (out_dir / "samples").mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        torchvision.utils.save_image((image + 1) / 2, out_dir / "samples" / f"{index:05d}.png")
    return save_grid(images, out_dir / "grid.png", nrow)


def run(cfg: DictConfig) -> Path:
    model = load_stage(LatentDiffusionModule, cfg.ckpt_path, "latent_diffusion", "ckpt_path")
    model.to(resolve_device(cfg.device))
    images = generate(
        model,
        cfg.num_samples,
        cfg.batch_size,
        cfg.seed,
        labels=OmegaConf.to_object(cfg.labels) if cfg.labels is not None else None,
        prompts=OmegaConf.to_object(cfg.prompts) if cfg.prompts is not None else None,
        sampler=cfg.sampler,
        steps=cfg.steps,
        eta=cfg.eta,
        guidance_scale=cfg.guidance_scale,
        negative_prompts=(
            OmegaConf.to_object(cfg.negative_prompts) if cfg.negative_prompts is not None else None
        ),
        unconditional=cfg.unconditional,
    )
    grid = write_samples(images, cfg.paths.output_dir, cfg.grid_nrow)
    OmegaConf.save(cfg, Path(cfg.paths.output_dir) / "config.yaml", resolve=True)
    log.info("Wrote %d samples and %s", len(images), grid)
    return grid


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
