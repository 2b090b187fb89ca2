"""Evaluate a checkpoint: ``python -m ldm_lightning.evaluate ckpt_path=...``.

Under an evaluation protocol (``protocol.*``, :mod:`ldm_lightning.metrics.protocol`):

- Latent diffusion: draws ``protocol.num_samples`` images in batches (``sampler``, ``steps``,
  ``guidance_scale``; conditions taken from the real images' labels/captions for conditional
  models) and reports FID (KID, IS, precision/recall, FD-DINOv2, CLIP score on request) against
  the real images of ``protocol.split``.
- Autoencoder: reconstructs the validation split and reports rFID, PSNR, SSIM, LPIPS and
  codebook usage (KID, IS, precision/recall, FD-DINOv2 on request).

Real-image features are cached in ``stats_dir``. Prints the protocol with a table and writes
``metrics.json`` (atomically, the protocol included) and a sample grid in the run directory.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig, OmegaConf, open_dict

from ldm_lightning.diffusion import sampler_class
from ldm_lightning.losses.perceptual import build_lpips
from ldm_lightning.metrics.clip_score import ClipScore
from ldm_lightning.metrics.evaluation import format_table, score_reconstructions, score_samples
from ldm_lightning.metrics.fid import sample_size_warning
from ldm_lightning.metrics.protocol import Protocol, check_text_model
from ldm_lightning.models import AutoencoderModule, LatentDiffusionModule
from ldm_lightning.models.checkpoints import (
    build_stage,
    checkpoint_kind,
    read_checkpoint,
    run_config_path,
)
from ldm_lightning.sampling import guidance_classifier, sampling_options
from ldm_lightning.utils.atomic import atomic_write_text
from ldm_lightning.utils.device import resolve_device
from ldm_lightning.utils.images import save_grid

log = logging.getLogger(__name__)

MODULES: dict[str, type[pl.LightningModule]] = {
    "autoencoder": AutoencoderModule,
    "latent_diffusion": LatentDiffusionModule,
}
# Which real images when split=null: train for samples (the published protocol), val for
# reconstructions.
DEFAULT_SPLIT = {"autoencoder": "val", "latent_diffusion": "train"}
GRID_SIZE = 64  # samples in samples.png


def data_config(
    cfg: DictConfig, ckpt_path: str | Path, cli_overrides: Sequence[str] = ()
) -> tuple[DictConfig, str]:
    """The data config to evaluate on and where it came from.

    The checkpoint's run directory (``<run>/checkpoints/x.ckpt`` -> ``<run>/config.yaml``, or
    an export folder's ``run_config.yaml``) holds the data the model was trained on; ``data.*``
    overrides apply on top of it. A ``data=<name>`` override, or a checkpoint without a run
    config, uses ``cfg.data``. ``cli_overrides`` are the command line's (Hydra's
    ``overrides.task``), read with Hydra's own override parser.
    """
    overrides = OverridesParser.create().parse_overrides(list(cli_overrides))
    run_config = run_config_path(ckpt_path)
    if any(override.key_or_group == "data" for override in overrides):
        return cfg.data, "the data= override"
    if not run_config.is_file():
        log.warning(
            "No config.yaml beside %s: evaluating on data=%s from this command. Pass data=... "
            "if the checkpoint was trained on other data.",
            ckpt_path,
            cfg.data._target_,
        )
        return cfg.data, "this command (no run config found)"
    saved = OmegaConf.load(run_config)
    if "data" not in saved:
        raise ValueError(f"{run_config} has no data section; pass data=<name> to choose the data")
    for override in overrides:
        if override.key_or_group.startswith("data."):
            _apply(saved, override)
    return saved.data, str(run_config)


def _apply(config: DictConfig, override: Override) -> None:
    """Set (``key=``, ``+key=``, ``++key=``: dicts merge) or delete (``~key``) one key."""
    key = override.key_or_group
    if not override.is_delete():
        OmegaConf.update(config, key, override.value(), merge=True, force_add=True)
        return
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(config, parent_key)
    if isinstance(parent, DictConfig) and leaf in parent:
        with open_dict(parent):
            del parent[leaf]


def check_image_size(module: LatentDiffusionModule, datamodule: Any) -> None:
    """FID compares like with like: the data must have the checkpoint's image size."""
    if module.hparams.image_size != datamodule.image_size:
        raise ValueError(
            f"the checkpoint was trained on {module.hparams.image_size} px images, but "
            f"data.image_size={datamodule.image_size}; FID compares like with like, so set "
            f"data.image_size={module.hparams.image_size}."
        )


def evaluate(cfg: DictConfig, cli_overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path`` under ``cfg.protocol``; returns what ``metrics.json`` holds."""
    checkpoint = read_checkpoint(cfg.ckpt_path, trust=cfg.trust_checkpoint)
    kind = checkpoint_kind(checkpoint)
    if kind not in MODULES:
        raise ValueError(
            f"ckpt_path={cfg.ckpt_path} is a {kind} checkpoint; evaluate takes an autoencoder "
            "or latent diffusion checkpoint."
        )
    protocol = Protocol.from_config(cfg.protocol, cfg.batch_size, DEFAULT_SPLIT[kind])
    device = resolve_device(cfg.device)
    module = build_stage(MODULES[kind], checkpoint, kind, cfg.ckpt_path)
    del checkpoint
    check_text_model(module, protocol.metrics)
    module.to(device)
    data_cfg, data_source = data_config(cfg, cfg.ckpt_path, cli_overrides)
    datamodule = hydra.utils.instantiate(data_cfg)
    if kind == "latent_diffusion":
        check_image_size(module, datamodule)
        module.adopt_data(datamodule)  # its classes must be the data's
        classifier = guidance_classifier(cfg, device)
        if classifier is not None:
            classifier.adopt_data(datamodule)  # it guides towards the labels of the data
    clip_score = ClipScore(cfg.clip_model) if "clip_score" in protocol.metrics else None
    metrics, extractors = protocol.build_metrics(
        datamodule, cfg.feature_extractor, cfg.dinov2_extractor, cfg.stats_dir, device,
        batch_size=cfg.batch_size, progress=cfg.progress,
    )
    if clip_score is not None:
        extractors["clip_score"] = {"network": clip_score.identity, "resize": clip_score.resize}
    out_dir = Path(cfg.paths.output_dir)
    if kind == "latent_diffusion":
        results, first = score_samples(
            module,
            datamodule,
            metrics,
            protocol.split,
            protocol.num_samples,
            cfg.batch_size,
            seed=protocol.seed,
            progress=cfg.progress,
            keep=GRID_SIZE if cfg.save_grid else 0,
            clip_score=clip_score,
            **sampling_options(cfg),
            classifier=classifier,
        )
        if first is not None:
            save_grid(first, out_dir / "samples.png")
        num_samples = results["num_generated"]
    else:
        lpips = build_lpips(**cfg.lpips).to(device) if cfg.lpips is not None else None
        results = score_reconstructions(
            module,
            datamodule,
            metrics,
            protocol.split,
            cfg.batch_size,
            limit=protocol.num_real,
            pixel_metrics=True,
            lpips=lpips,
            progress=cfg.progress,
        )
        num_samples = results["num_images"]
    results = {"split": protocol.split, **results}
    warning = sample_size_warning(num_samples)
    report = {
        "ckpt_path": str(cfg.ckpt_path),
        "kind": kind,
        "dataset": datamodule.name,
        "data_config": data_source,
        "protocol": protocol.record(extractors),
        "feature_extractor": extractors["fid"]["network"],
        "num_samples": num_samples,
        "warning": warning,
        "metrics": results,
    }
    if kind == "latent_diffusion":
        settings = module.sampling_settings(cfg.sampler, cfg.steps, cfg.eta, cfg.timestep_spacing)
        report["sampling"] = {
            **settings,
            # The sampler's name, also for a _target_ dict, which sampler_config holds.
            "sampler": sampler_class(settings["sampler"]).name,
            "sampler_config": settings["sampler"],
            "guidance_scale": cfg.guidance_scale,
            "guidance_rescale": cfg.guidance_rescale,
            "guidance_interval": sampling_options(cfg)["guidance_interval"],
            "classifier_ckpt": cfg.classifier_ckpt,
            "classifier_scale": cfg.classifier_scale,
            "seed": protocol.seed,
        }
    atomic_write_text(out_dir / "metrics.json", json.dumps(report, indent=2))
    print(
        f"{kind} checkpoint {cfg.ckpt_path}: {num_samples} samples, {datamodule.name} "
        f"{results['split']} split, features: "
        + ", ".join(f"{name} {part['network']} (resize {part['resize']})"
                    for name, part in extractors.items())
    )
    print(protocol.describe())
    print(format_table({k: v for k, v in results.items() if k != "split"}))
    if warning:
        log.warning(warning)
    log.info("Wrote %s", out_dir / "metrics.json")
    return report


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg, HydraConfig.get().overrides.task)


if __name__ == "__main__":
    main()
