"""Variants compared at equal wall-clock budget: quality along training time, as a table and plots.

The question of LDM sec. 4.1 (Fig. 6, 7): how fast does each variant (pixel or latent space,
f=4 or f=8, UNet or DiT, DDPM, flow or EDM) reach a given quality? Each variant is a training
run whose :class:`~ldm_lightning.callbacks.timed_checkpoints.TimedCheckpoints` wrote
checkpoints along training time (``checkpoints/timed/*.ckpt``, stamped with the seconds
trained). Here:

- :func:`find_runs`: the runs of run directories or Hydra multirun directories, with the
  overrides that made them (``.hydra/overrides.yaml``), and :func:`variant_names`;
- :func:`score_checkpoint`: samples of one checkpoint with fixed settings (``per_class`` of
  every class of a class model), their FID against real features, and on ``shapes`` the
  checker's accuracy, clean share and shape IoU (:mod:`ldm_lightning.metrics.shapes_checker`);
- :func:`markdown` and :func:`plot_report`: the table (at the end of each run and at every
  checkpoint, with the command that reproduces each variant) and one PNG per metric, quality
  against training seconds, a line per variant.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from ldm_lightning.callbacks.timed_checkpoints import TIME_KEY
from ldm_lightning.metrics.fid import GenerativeMetrics
from ldm_lightning.metrics.shapes_checker import CLEAN_IOU, score_labels
from ldm_lightning.sampling import batch_conditions, generate, per_class_labels
from ldm_lightning.utils.curves import plot_lines

__all__ = [
    "METRICS",
    "Run",
    "find_runs",
    "markdown",
    "plot_report",
    "score_checkpoint",
    "training_time",
    "variant_names",
]

TIMED_DIR = Path("checkpoints") / "timed"  # where TimedCheckpoints writes (conf/callbacks)
# Reported quality metrics: (key, column title, lower is better).
METRICS = (
    ("fid", "FID", True),
    ("accuracy", "accuracy", False),
    ("clean", f"clean (IoU > {CLEAN_IOU})", False),
    ("shape_iou", "shape IoU", False),
)
HOW_TO_TRAIN = (
    "train the variants with time-stamped checkpoints: +experiment=shapes_compare does, or "
    "add callbacks=[ema,timed_checkpoints] (callbacks=timed_checkpoints without EMA) to any run"
)


@dataclass(frozen=True)
class Run:
    """A training run of a comparison: its directory, the command-line overrides it ran with
    (None without ``.hydra/overrides.yaml``) and its time-stamped checkpoints, in time order."""

    path: Path
    overrides: tuple[str, ...] | None
    checkpoints: tuple[Path, ...]

    @property
    def command(self) -> str | None:
        """The command that trains this run again (in a new run directory)."""
        if self.overrides is None:
            return None
        return " ".join(["python -m ldm_lightning.train", *map(shlex.quote, self.overrides)])

    def data_config(self) -> Any:
        """The ``data`` section of the run's resolved ``config.yaml``."""
        path = self.path / "config.yaml"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist: the report reads each run's data from the config.yaml "
                "that `python -m ldm_lightning.train` writes in its run directory."
            )
        return OmegaConf.load(path).data


def _is_run(path: Path) -> bool:
    return (path / "checkpoints").is_dir() or (path / ".hydra").is_dir()


def _read_run(path: Path) -> Run:
    checkpoints = tuple(sorted((path / TIMED_DIR).glob("*.ckpt")))
    if not checkpoints:
        raise FileNotFoundError(
            f"run directory {path} has no time-stamped checkpoints ({TIMED_DIR}/*.ckpt); "
            f"{HOW_TO_TRAIN}."
        )
    overrides_file = path / ".hydra" / "overrides.yaml"
    overrides = (
        tuple(str(o) for o in OmegaConf.load(overrides_file)) if overrides_file.is_file() else None
    )
    return Run(path, overrides, checkpoints)


def find_runs(paths: str | Path | Iterable[str | Path]) -> list[Run]:
    """The runs of ``paths``: each a run directory (it has ``checkpoints/`` or ``.hydra/``) or a
    directory of runs, such as a Hydra multirun's (``<sweep>/0``, ``<sweep>/1``, ..., in job
    order). A run without time-stamped checkpoints is an error that says how to make them."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise ValueError("no runs given: pass run or multirun directories, runs=[dir,...]")
    runs = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a directory (a run or a multirun directory)")
        if _is_run(path):
            runs.append(_read_run(path))
            continue
        jobs = sorted((p for p in path.iterdir() if p.is_dir() and _is_run(p)),
                      key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0,
                                     p.name))
        if not jobs:
            raise FileNotFoundError(
                f"{path} is neither a run directory (checkpoints/, .hydra/) nor a directory of "
                "runs (a multirun's job folders)"
            )
        runs.extend(_read_run(job) for job in jobs)
    return runs


def variant_names(runs: Sequence[Run]) -> list[str]:
    """A name per run: the overrides that differ between the runs (leading ``+`` dropped), e.g.
    ``compare=latent_f4 model/process=flow``; the run directory's name where they do not
    tell the runs apart (one run, or runs without overrides)."""
    sets = [set(run.overrides or ()) for run in runs]
    shared = set.intersection(*sets) if sets else set()
    names = [
        " ".join(o.lstrip("+") for o in run.overrides or () if o not in shared) or run.path.name
        for run in runs
    ]
    if len(set(names)) < len(names):
        names = [f"{name} ({run.path.name})" for name, run in zip(names, runs, strict=True)]
    return names


def training_time(checkpoint: Mapping[str, Any], path: str | Path) -> dict[str, float | int]:
    """The ``training_time`` stamp of a checkpoint (train and wall seconds, step, epoch)."""
    stamp = checkpoint.get(TIME_KEY)
    if not isinstance(stamp, Mapping) or "train_seconds" not in stamp:
        raise ValueError(f"{path} holds no training time ({TIME_KEY}); {HOW_TO_TRAIN}.")
    return dict(stamp)


@torch.no_grad()
def score_checkpoint(
    module: pl.LightningModule,
    metrics: GenerativeMetrics,
    per_class: int,
    num_samples: int,
    batch_size: int,
    shapes: bool,
    seed: int = 0,
    progress: bool = False,
    **sampling: Any,
) -> tuple[dict[str, float], torch.Tensor, list[int] | None]:
    """Scores of a latent diffusion ``module``'s samples, the samples ``[N, 3, H, W]`` and the
    label each asked for (None: an unconditional module).

    A class-conditional module draws ``per_class`` samples of every class, another
    ``num_samples``; batch ``b`` has seed ``seed + b`` (:func:`~ldm_lightning.sampling.generate`,
    ``sampling``: sampler, steps, guidance, ...). The scores: ``samples`` (N), ``fid``
    (``metrics``, whose real features are set), ``sampling_seconds`` and, with ``shapes``, the
    checker's ``shape_iou`` and ``clean`` and, for a class model, ``accuracy``.
    """
    conditioner = getattr(module, "conditioner", None)
    labels = None
    if getattr(conditioner, "inputs", None) == "labels":
        labels, _ = per_class_labels(module, per_class)
        num_samples = len(labels)
    start = time.perf_counter()
    conditions = batch_conditions(num_samples, batch_size, labels)
    batches = generate(module, num_samples, batch_size, conditions, seed=seed, progress=progress,
                       **sampling)
    images = []
    for batch in batches:
        metrics.update(batch)
        images.append(batch.cpu())
    seconds = time.perf_counter() - start
    samples = torch.cat(images)
    scores = {"samples": len(samples), "fid": metrics.compute()["fid"],
              "sampling_seconds": round(seconds, 1)}
    if shapes:
        scores.update(score_labels(samples, labels))
    return scores, samples, labels


# ---------------------------------------------------------------------- the report
def _cell(key: str, value: Any) -> str:
    if value is None:
        return "—"
    if key in ("accuracy", "clean"):
        return f"{value:.1%}"
    if key == "shape_iou":
        return f"{value:.3f}"
    if key == "fid":
        return f"{value:.2f}"
    return f"{value:.0f}" if isinstance(value, float) else str(value)


def _or_default(value: Any) -> str:
    return "the checkpoint's" if value is None else str(value)


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> list[str]:
    metrics = [(key, title) for key, title, _ in METRICS if any(key in row for row in rows)]
    header = [title for _, title in [*columns, *metrics]]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "---|" * len(columns) + "---:|" * len(metrics)]
    for row in rows:
        cells = [_cell(key, row.get(key)) for key, _ in [*columns, *metrics]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(report: Mapping[str, Any], plots: Sequence[Path] = ()) -> str:
    """``compare.md``: the settings, the table at the end of each run and along training, the
    commands that reproduce each variant, and the plots (``plots``, beside the file)."""
    runs = report["runs"]
    setting = report["settings"]
    finals = [{"variant": run["variant"], **run["checkpoints"][-1]} for run in runs]
    along = [{"variant": run["variant"], **row} for run in runs for row in run["checkpoints"]]
    time_columns = [("train_seconds", "train s"), ("wall_seconds", "wall s"),
                    ("global_step", "steps")]
    lines = [
        "# Quality vs training time",
        "",
        f"Each checkpoint: {setting['per_class']} samples of every class (class-conditional "
        f"models; else {setting['num_samples']}), sampler {_or_default(setting['sampler'])}, "
        f"{_or_default(setting['steps'])} steps, guidance {setting['guidance_scale']}, seed "
        f"{setting['seed']}. FID against {report['num_real']} {report['split']} images of "
        f"{report['dataset']}, features: `{report['feature_extractor']}`."
        + (f" {report['warning']}" if report.get("warning") else ""),
        "",
        "*train s*: seconds of training, validation excluded (see "
        "`ldm_lightning/callbacks/timed_checkpoints.py`); *wall s*: all seconds since training "
        "started, what `trainer.max_time` counts; *steps*: optimizer steps."
        + (" *accuracy*: samples the checker reads as the asked-for shape and colour; *clean*: "
           "shapes whose IoU with their best clean fit is above "
           f"{CLEAN_IOU}." if any("shape_iou" in row for row in along) else ""),
        "",
        "## At the end of each run",
        "",
        *_table(finals, [("variant", "variant"), *time_columns]),
        "",
        "## Along training",
        "",
        *_table(along, [("variant", "variant"), ("checkpoint", "checkpoint"), *time_columns]),
        "",
        "## Commands",
        "",
    ]
    for run in runs:
        command = f"`{run['command']}`" if run["command"] else "(no .hydra/overrides.yaml)"
        lines.append(f"- **{run['variant']}** (`{run['path']}`): {command}")
    if report.get("command"):
        lines += ["", f"This report: `{report['command']}`"]
    lines += ["", *(f"![{path.stem}]({path.name})" for path in plots)]
    return "\n".join(lines) + "\n"


def plot_report(report: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """``<metric>.png`` in ``out_dir`` for each metric the report holds: the metric against
    training seconds, one line per variant."""
    paths = []
    for key, title, lower in METRICS:
        lines = {
            run["variant"]: [(row["train_seconds"], row[key]) for row in run["checkpoints"]]
            for run in report["runs"]
            if all(key in row for row in run["checkpoints"])
        }
        if not lines:
            continue
        better = "lower" if lower else "higher"
        paths.append(plot_lines(
            lines, Path(out_dir) / f"{key}.png", "training seconds (validation excluded)",
            f"{title} ({better} is better)", f"{title} vs training time",
        ))
    return paths
