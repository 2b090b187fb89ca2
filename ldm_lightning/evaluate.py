"""Evaluate a checkpoint: ``python -m ldm_lightning.evaluate ckpt_path=... num_samples=10000``.

- Latent diffusion: draws ``num_samples`` images in batches (``sampler``, ``steps``,
  ``guidance_scale``; conditions taken from the real images' labels/captions for conditional
  models) and reports FID (KID, IS on request) against the real images of ``split``.
- Autoencoder: reconstructs the validation split and reports rFID, PSNR, SSIM, LPIPS and
  codebook usage.

Real-image features are cached in ``stats_dir``. Prints a table and writes ``metrics.json``
(atomically) and a sample grid in the run directory.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from ldm_lightning.metrics.fid import (
    GenerativeMetrics,
    build_feature_extractor,
    extractor_identity,
    real_features,
    sample_size_warning,
)
from ldm_lightning.metrics.reconstruction import ReconstructionMetrics
from ldm_lightning.models import AutoencoderModule, LatentDiffusionModule
from ldm_lightning.models.checkpoints import (
    checkpoint_kind,
    load_stage,
    read_checkpoint,
    run_config_path,
)
from ldm_lightning.sample import generate
from ldm_lightning.utils.atomic import atomic_write_text
from ldm_lightning.utils.device import resolve_device
from ldm_lightning.utils.images import save_grid

log = logging.getLogger(__name__)

MODULES: dict[str, type[pl.LightningModule]] = {
    "autoencoder": AutoencoderModule,
    "latent_diffusion": LatentDiffusionModule,
}
OPTIONAL_METRICS = ("fid", "kid", "is")


def data_config(
    cfg: DictConfig, ckpt_path: str | Path, cli_overrides: Sequence[str] = ()
) -> tuple[DictConfig, str]:
    """The data config to evaluate on and where it came from.

    The checkpoint's run directory (``<run>/checkpoints/x.ckpt`` -> ``<run>/config.yaml``, or
    an export folder's ``run_config.yaml``) holds the data the model was trained on; ``data.*``
    overrides apply on top of it. A ``data=<name>`` override, or a checkpoint without a run
    config, uses ``cfg.data``.
    """
    keys = [o.lstrip("+~").split("=", 1)[0] for o in cli_overrides]
    run_config = run_config_path(ckpt_path)
    if "data" in keys:
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
    updates = [o.lstrip("+") for o in cli_overrides if o.lstrip("+").startswith("data.")]
    data = OmegaConf.merge(saved.data, OmegaConf.from_dotlist(updates).get("data", {}))
    return data, str(run_config)


def sampling_conditions(
    module: pl.LightningModule, datamodule: Any, split: str, batch_size: int
) -> Iterator[dict[str, Any]]:
    """Per-batch sampling inputs (labels/prompts) cycled from the real images of ``split``.

    Conditional models are sampled with the conditions of the real data, so FID compares
    like with like; unconditional models get no inputs.
    """
    conditioner = getattr(module, "conditioner", None)
    if conditioner is None or not conditioner.is_conditional:
        return itertools.repeat({})
    loader = DataLoader(datamodule.build_split(split, augment=False), batch_size=batch_size)
    # Re-iterate the loader rather than itertools.cycle, which would keep every batch (images
    # included) in memory for the whole run.
    batches = (batch for _ in itertools.count() for batch in loader)
    return (conditioner.sampling_inputs(batch, batch_size) for batch in batches)


def evaluate_diffusion(
    module: LatentDiffusionModule,
    datamodule: Any,
    extractor: torch.nn.Module,
    cfg: DictConfig,
    out_dir: Path,
) -> dict[str, Any]:
    """FID (KID, IS) of ``cfg.num_samples`` samples against the real images of the split."""
    if module.hparams.image_size != datamodule.image_size:
        raise ValueError(
            f"the checkpoint was trained on {module.hparams.image_size} px images, but "
            f"data.image_size={datamodule.image_size}; FID compares like with like, so set "
            f"data.image_size={module.hparams.image_size}."
        )
    split = cfg.split or "train"
    metrics = _generative_metrics(datamodule, split, extractor, cfg)
    conditions = sampling_conditions(module, datamodule, split, cfg.batch_size)
    samples = generate(
        module,
        cfg.num_samples,
        cfg.batch_size,
        conditions,
        seed=cfg.seed,
        progress=cfg.progress,
        sampler=cfg.sampler,
        steps=cfg.steps,
        eta=cfg.eta,
        timestep_spacing=cfg.timestep_spacing,
        guidance_scale=cfg.guidance_scale,
        guidance_rescale=cfg.guidance_rescale,
    )
    first: list[torch.Tensor] = []
    for images in samples:
        metrics.update(images)
        if sum(map(len, first)) < 64:
            first.append(images.cpu())
    if cfg.save_grid:
        save_grid(torch.cat(first)[:64], out_dir / "samples.png")
    return {"split": split, **metrics.compute()}


def evaluate_autoencoder(
    module: AutoencoderModule, datamodule: Any, extractor: torch.nn.Module, cfg: DictConfig
) -> dict[str, Any]:
    """rFID, PSNR, SSIM, LPIPS and codebook usage of the reconstructions of the split."""
    split = cfg.split or "val"
    metrics = _generative_metrics(datamodule, split, extractor, cfg)
    lpips = None
    if cfg.lpips is not None:
        from ldm_lightning.losses.perceptual import build_lpips

        lpips = build_lpips(**cfg.lpips).to(module.device)
    n_embed = module.quantize.n_embed if module.regularizer == "vq" else None
    reconstruction = ReconstructionMetrics(lpips=lpips, n_embed=n_embed)
    dataset = datamodule.build_split(split, augment=False)
    if cfg.num_real is not None:
        dataset = torch.utils.data.Subset(dataset, range(cfg.num_real))
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False)
    with torch.no_grad():
        for batch in tqdm(loader, desc="reconstructing", disable=not cfg.progress):
            x = batch["image"].to(module.device)
            x_hat, _, info = module(x, sample_posterior=False)
            x_hat = x_hat.clamp(-1, 1)
            reconstruction.update(x, x_hat, info.get("indices"))
            metrics.update(x_hat)
    results = metrics.compute()
    results = {"rfid": results.pop("fid"), **results}
    return {"split": split, **results, **reconstruction.compute()}


def _generative_metrics(
    datamodule: Any, split: str, extractor: torch.nn.Module, cfg: DictConfig
) -> GenerativeMetrics:
    real = real_features(
        datamodule, split, extractor, cfg.stats_dir, cfg.num_real, cfg.batch_size, cfg.progress
    )
    return GenerativeMetrics(
        extractor,
        real,
        kid="kid" in cfg.metrics,
        inception_score="is" in cfg.metrics,
        kid_subset_size=cfg.kid_subset_size,
        is_splits=cfg.is_splits,
    )


def format_table(metrics: dict[str, Any]) -> str:
    """Metric names and values as an aligned two-column text table."""
    width = max(map(len, metrics))
    rows = [
        f"{name:<{width}}  {value:.4f}" if isinstance(value, float) else f"{name:<{width}}  {value}"
        for name, value in metrics.items()
    ]
    rule = "-" * max(map(len, rows))
    return "\n".join([rule, *rows, rule])


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON over ``path`` atomically: a kill leaves the old file."""
    atomic_write_text(path, json.dumps(payload, indent=2))


def evaluate(cfg: DictConfig, cli_overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path``; returns what ``metrics.json`` holds."""
    checkpoint = read_checkpoint(cfg.ckpt_path, trust=cfg.trust_checkpoint)
    kind = checkpoint_kind(checkpoint)
    del checkpoint
    if kind not in MODULES:
        raise ValueError(
            f"ckpt_path={cfg.ckpt_path} is a {kind} checkpoint; evaluate takes an autoencoder "
            "or latent diffusion checkpoint."
        )
    unknown = set(cfg.metrics) - set(OPTIONAL_METRICS)
    if unknown:
        raise ValueError(
            f"metrics={list(cfg.metrics)} has unknown {sorted(unknown)}; choose from "
            f"{list(OPTIONAL_METRICS)}"
        )
    device = resolve_device(cfg.device)
    module = load_stage(MODULES[kind], cfg.ckpt_path, kind, trust=cfg.trust_checkpoint)
    module.to(device)
    data_cfg, data_source = data_config(cfg, cfg.ckpt_path, cli_overrides)
    datamodule = hydra.utils.instantiate(data_cfg)
    extractor = build_feature_extractor(cfg.feature_extractor).to(device)
    out_dir = Path(cfg.paths.output_dir)
    if kind == "latent_diffusion":
        results = evaluate_diffusion(module, datamodule, extractor, cfg, out_dir)
        num_samples = results["num_generated"]
    else:
        results = evaluate_autoencoder(module, datamodule, extractor, cfg)
        num_samples = results["num_images"]
    warning = sample_size_warning(num_samples)
    report = {
        "ckpt_path": str(cfg.ckpt_path),
        "kind": kind,
        "dataset": datamodule.name,
        "data_config": data_source,
        "feature_extractor": extractor_identity(extractor),
        "num_samples": num_samples,
        "warning": warning,
        "metrics": results,
    }
    if kind == "latent_diffusion":
        sampling = {**(module.hparams.sampling or {})}
        report["sampling"] = {
            "sampler": cfg.sampler or sampling.get("sampler"),
            "steps": cfg.steps or sampling.get("steps"),
            "eta": sampling.get("eta") if cfg.eta is None else cfg.eta,
            "timestep_spacing": cfg.timestep_spacing or sampling.get("timestep_spacing"),
            "guidance_scale": cfg.guidance_scale,
            "guidance_rescale": cfg.guidance_rescale,
            "seed": cfg.seed,
        }
    write_json_atomic(out_dir / "metrics.json", report)
    print(
        f"{kind} checkpoint {cfg.ckpt_path}: {num_samples} samples, {datamodule.name} "
        f"{results['split']} split, features: {report['feature_extractor']}"
    )
    print(format_table({k: v for k, v in results.items() if k != "split"}))
    if warning:
        log.warning(warning)
    log.info("Wrote %s", out_dir / "metrics.json")
    return report


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    evaluate(cfg, HydraConfig.get().overrides.task)


if __name__ == "__main__":
    main()
