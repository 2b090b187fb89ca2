"""Every stage of an experiment in one command: ``python -m ldm_lightning.pipeline``.

    python -m ldm_lightning.pipeline +experiment=folder_ldm_class data.root=<folder>

composes the same config as ``train`` would and runs, each in its own folder under
``pipeline.dir``:

1. ``first_stage/``: the experiment named by ``pipeline.first_stage`` (an autoencoder), unless
   ``model.first_stage`` already names a checkpoint or the identity;
2. ``conditioner/``: the experiment named by ``pipeline.conditioner`` (a text conditioner whose
   checkpoint becomes ``model.conditioning.text_ckpt_path``), unless that is given;
3. ``ldm/``: this experiment, on the checkpoints of 1 and 2;
4. ``samples/``: ``python -m ldm_lightning.sample`` (``per_class`` samples of every class for a
   class-conditional model, else ``num_samples``);
5. ``evaluate/``: ``python -m ldm_lightning.evaluate`` (``metrics.json``), unless
   ``pipeline.evaluate`` is null.

The command line's other overrides (``data.root=...``, ``trainer=gpu``, ...) apply to every
training stage; ``pipeline.first_stage_overrides`` / ``conditioner_overrides`` (lists) change
the earlier stages' own model keys. A stage that finished is reused; one that was interrupted
resumes from its ``last.ckpt``: running the same command again continues where it stopped. A
stage folder that holds a run of another config is refused rather than reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from ldm_lightning.evaluate import evaluate
from ldm_lightning.models.checkpoints import run_config_path
from ldm_lightning.models.conditioning.build import conditioning_config
from ldm_lightning.sample import run as sample
from ldm_lightning.train import train
from ldm_lightning.utils.atomic import atomic_write

log = logging.getLogger(__name__)

DONE = "stage.json"  # written when a training stage finished: the checkpoint and config hash
# Keys that differ between two runs of the same stage without changing what it trains.
RUN_KEYS = ("paths", "ckpt_path", "pipeline", "hydra")


def config_hash(cfg: DictConfig) -> str:
    """sha256 of the resolved config without where it runs (``RUN_KEYS``)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    kept = {key: value for key, value in config.items() if key not in RUN_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def compose_stage(experiment: str, overrides: Sequence[str]) -> DictConfig:
    """The ``train`` config of ``+experiment=<experiment>`` with the shared ``overrides``."""
    return hydra.compose("train", overrides=[f"+experiment={experiment}", *overrides])


def shared_overrides(task_overrides: Sequence[str]) -> list[str]:
    """The command line's overrides for every stage: all but the experiment and ``model``'s
    and ``pipeline``'s own (those belong to the last stage)."""
    own = ("+experiment=", "experiment=", "model", "+model", "~model", "pipeline", "+pipeline")
    return [override for override in task_overrides if not override.startswith(own)]


def train_stage(name: str, cfg: DictConfig, out_dir: Path) -> Path:
    """Train ``cfg`` in ``out_dir`` (reused when finished, resumed when interrupted); returns
    its ``checkpoints/last.ckpt``."""
    digest = config_hash(cfg)
    done, last = out_dir / DONE, out_dir / "checkpoints" / "last.ckpt"
    if done.is_file():
        record = json.loads(done.read_text())
        check_same_run(name, out_dir, record["config_sha256"], digest)
        log.info("Stage %s: finished before, reusing %s", name, record["checkpoint"])
        return Path(record["checkpoint"])
    started = out_dir / "stage_config.json"
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
        if last.is_file() and started.is_file():
            check_same_run(name, out_dir, json.loads(started.read_text())["config_sha256"], digest)
            log.info("Stage %s: resuming from %s", name, last)
            cfg.ckpt_path = str(last)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(started, "w") as file:
        json.dump({"config_sha256": digest}, file)
    log.info("Stage %s: training in %s", name, out_dir)
    train(cfg)
    with atomic_write(done, "w") as file:
        json.dump({"checkpoint": str(last), "config_sha256": digest}, file)
    return last


def check_same_run(name: str, out_dir: Path, saved: str, digest: str) -> None:
    if saved != digest:
        raise ValueError(
            f"stage {name}: {out_dir} holds a run of another config (data, model or trainer "
            "changed since). Choose another folder with pipeline.dir=..., or delete that one "
            "to train the stage again."
        )


def run_pipeline(cfg: DictConfig, task_overrides: Sequence[str]) -> dict[str, Any]:
    """Run every stage of ``cfg`` (the composed ``train`` config); returns the evaluation
    report (empty without one) and the paths written."""
    settings = cfg.pipeline
    root = Path(settings.dir)
    shared = shared_overrides(task_overrides)
    ldm = cfg.copy()
    with open_dict(ldm):
        if settings.first_stage and not (ldm.model.first_stage.ckpt_path
                                         or ldm.model.first_stage.identity):
            stage = compose_stage(settings.first_stage, [*shared, *settings.first_stage_overrides])
            ldm.model.first_stage.ckpt_path = str(
                train_stage("first_stage", stage, root / "first_stage")
            )
        if settings.conditioner and not ldm.model.conditioning.get("text_ckpt_path"):
            stage = compose_stage(settings.conditioner, [*shared, *settings.conditioner_overrides])
            stage.model.first_stage.ckpt_path = ldm.model.first_stage.ckpt_path
            ldm.model.conditioning.text_ckpt_path = str(
                train_stage("conditioner", stage, root / "conditioner")
            )
    checkpoint = train_stage("ldm", ldm, root / "ldm")
    written: dict[str, Any] = {"checkpoint": str(checkpoint)}
    samples_dir = root / "samples"
    if not (samples_dir / "grid.png").is_file():
        options = sample_options(checkpoint, settings.sample)
        sample(compose_entry("sample", checkpoint, samples_dir, options))
    written["grid"] = str(samples_dir / "grid.png")
    if settings.evaluate is not None:
        evaluate_dir = root / "evaluate"
        if not (evaluate_dir / "metrics.json").is_file():
            options = OmegaConf.to_container(settings.evaluate, resolve=True)
            evaluate(compose_entry("evaluate", checkpoint, evaluate_dir, options))
        written["metrics"] = json.loads((evaluate_dir / "metrics.json").read_text())
    log.info("Pipeline done: %s", json.dumps(written, default=str))
    return written


def compose_entry(
    name: str, checkpoint: Path, out_dir: Path, options: dict[str, Any]
) -> DictConfig:
    """The ``sample`` / ``evaluate`` config for ``checkpoint`` with ``options`` on top."""
    cfg = hydra.compose(name, overrides=[f"ckpt_path={checkpoint}"])
    with open_dict(cfg):
        cfg.merge_with(options)
        cfg.paths.output_dir = str(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return cfg


def sample_options(checkpoint: Path, options: DictConfig, num_prompts: int = 8) -> dict[str, Any]:
    """``pipeline.sample`` for the LDM's kind of conditioning: ``per_class`` samples of every
    class for a class model, the first ``num_prompts`` distinct validation captions of its data
    for a text model (unless ``prompts`` are given), ``num_samples`` otherwise."""
    options = OmegaConf.to_container(options, resolve=True)
    per_class = options.pop("per_class", None)
    run_config = OmegaConf.load(run_config_path(checkpoint))
    conditioning = OmegaConf.to_container(run_config.model.get("conditioning") or {})
    inputs = getattr(conditioning_config(conditioning)[0], "inputs", None)
    if inputs == "labels":
        options["per_class"] = per_class
    elif inputs == "prompts" and options.get("prompts") is None:
        captions = hydra.utils.instantiate(run_config.data).captions("val")
        options["prompts"] = sorted(set(captions))[:num_prompts]
    return options


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="pipeline")
def main(cfg: DictConfig) -> None:
    run_pipeline(cfg, HydraConfig.get().overrides.task)


if __name__ == "__main__":
    main()
