"""Report a comparison at equal wall-clock budget: ``python -m ldm_lightning.compare runs=[...]``.

Reads the runs (run directories, or a multirun's directory: one job per variant, e.g.
``python -m ldm_lightning.train -m +experiment=shapes_compare compare=pixel,latent_f4,...``),
samples every time-stamped checkpoint of each with the same settings, and scores it: FID
against the real images of the runs' data with the configured feature extractor, and on
``shapes`` the checker's accuracy, clean share and shape IoU. Writes to ``out_dir``,
atomically: ``compare.json`` (every number), ``compare.md`` (the tables, the commands that
reproduce each variant, the plots), ``<metric>.png`` (quality vs training seconds, a line per
variant) and, with ``save_grids``, ``grids/<variant>/<checkpoint>.png``. See
:mod:`ldm_lightning.metrics.comparison`.
"""

from __future__ import annotations

import json
import logging
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ldm_lightning.metrics.comparison import (
    find_runs,
    markdown,
    plot_report,
    score_checkpoint,
    training_time,
    variant_names,
)
from ldm_lightning.metrics.fid import (
    GenerativeMetrics,
    build_feature_extractor,
    extractor_identity,
    real_features,
    real_features_key,
    sample_size_warning,
)
from ldm_lightning.models import LatentDiffusionModule
from ldm_lightning.models.checkpoints import build_stage, read_checkpoint
from ldm_lightning.sampling import folder_name, sampling_options
from ldm_lightning.utils.atomic import atomic_write_text
from ldm_lightning.utils.device import resolve_device
from ldm_lightning.utils.images import save_grid

log = logging.getLogger(__name__)


def compare(cfg: DictConfig, command: str | None = None) -> dict[str, Any]:
    """Score every checkpoint of ``cfg.runs`` and write the report; returns what
    ``compare.json`` holds. ``command`` is the report's own command line, recorded in it."""
    runs = find_runs(OmegaConf.to_object(cfg.runs) if OmegaConf.is_config(cfg.runs) else cfg.runs)
    device = resolve_device(cfg.device)
    extractor = build_feature_extractor(cfg.feature_extractor).to(device)
    sampling = {  # plain values: a sampler given as a {_target_: ...} dict is written to JSON
        k: OmegaConf.to_object(v) if OmegaConf.is_config(v) else v
        for k, v in sampling_options(cfg).items()
    }
    out_dir = Path(cfg.out_dir)
    data_key, results = None, []
    for run, variant in zip(runs, variant_names(runs), strict=True):
        datamodule = hydra.utils.instantiate(run.data_config())
        key = real_features_key(datamodule, cfg.split, extractor, cfg.num_real)
        if data_key is not None and key != data_key:
            raise ValueError(
                f"{run.path} was trained on other data than the runs before it ({key} vs "
                f"{data_key}): FIDs against other real images do not compare."
            )
        data_key = key
        real = real_features(datamodule, cfg.split, extractor, cfg.stats_dir, cfg.num_real,
                             cfg.batch_size, cfg.progress)
        rows = []
        for path in run.checkpoints:
            checkpoint = read_checkpoint(path, trust=cfg.trust_checkpoint)
            stamp = training_time(checkpoint, path)
            module = build_stage(LatentDiffusionModule, checkpoint, "latent_diffusion", path)
            del checkpoint
            module.to(device).adopt_data(datamodule)
            scores, images, labels = score_checkpoint(
                module, GenerativeMetrics(extractor, real), cfg.per_class, cfg.num_samples,
                cfg.batch_size, shapes=datamodule.name == "shapes", seed=cfg.seed,
                progress=cfg.progress, **sampling,
            )
            if cfg.save_grids:
                save_grid(images, out_dir / "grids" / folder_name(variant) / f"{path.stem}.png",
                          nrow=cfg.per_class if labels else None)
            rows.append({"checkpoint": path.name, **stamp, **scores})
            log.info("%s %s: %s", variant, path.name, json.dumps(rows[-1]))
        results.append({"variant": variant, "path": str(run.path), "command": run.command,
                        "checkpoints": rows})
    report = {
        "dataset": datamodule.name,
        "split": cfg.split,
        "num_real": real.shape[0],
        "feature_extractor": extractor_identity(extractor),
        "warning": sample_size_warning(
            min(row["samples"] for run in results for row in run["checkpoints"])
        ),
        "settings": {**sampling, "seed": cfg.seed, "per_class": cfg.per_class,
                     "num_samples": cfg.num_samples},
        "command": command,
        "runs": results,
    }
    atomic_write_text(out_dir / "compare.json", json.dumps(report, indent=2))
    plots = plot_report(report, out_dir)
    atomic_write_text(out_dir / "compare.md", markdown(report, plots))
    print(markdown(report, plots))
    log.info("Wrote %s", out_dir / "compare.md")
    return report


def command_line(overrides: Sequence[str]) -> str:
    return " ".join(["python -m ldm_lightning.compare", *map(shlex.quote, overrides)])


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="compare_report")
def main(cfg: DictConfig) -> None:
    compare(cfg, command_line(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    main()
