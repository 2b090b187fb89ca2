"""A wandb logger that needs no account: offline unless an API key is configured.

``logger=wandb`` must never prompt for a login nor crash on a machine without one. The run is
online when ``WANDB_MODE=online`` is set or an API key is found (``WANDB_API_KEY``, or a
``~/.netrc`` entry for the wandb host, which ``wandb login`` writes); otherwise it is written
offline under the run directory, to upload later with ``wandb sync <dir>``. Runs are grouped
by experiment (``task_name``; a sweep's jobs share the group ``<task_name>-<sweep dir>``) and
tagged, so a sweep reads as one dashboard. Under SLURM the run id derives from the job id, so
a job that is preempted and requeued keeps logging to the same run.
"""

from __future__ import annotations

import logging
import netrc
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.loggers import WandbLogger

log = logging.getLogger(__name__)
OFFLINE_MODES = ("offline", "dryrun", "disabled")


def wandb_host() -> str:
    """The wandb API host (``WANDB_BASE_URL``'s, default ``api.wandb.ai``)."""
    return urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or ""


def has_api_key() -> bool:
    """Whether wandb could log in without asking: an env key or a netrc entry for the host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return netrc.netrc(path).authenticators(wandb_host()) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def use_offline(offline: bool | None = None) -> bool:
    """``offline`` if given; else offline unless ``WANDB_MODE=online`` or an API key exists."""
    if offline is not None:
        return offline
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in OFFLINE_MODES:
        return True
    return mode != "online" and not has_api_key()


def run_group_and_name(task_name: str) -> tuple[str, str]:
    """``(group, name)``: the task's, or in a multirun ``<task>-<sweep dir>``, ``<task>-<job>``."""
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            sweep = Path(hydra_cfg.sweep.dir).name
            return f"{task_name}-{sweep}", f"{task_name}-{hydra_cfg.job.num}"
    return task_name, task_name


def slurm_run_id(task_name: str) -> str | None:
    """A run id that a requeued SLURM job gets again: ``<task>-<job id>``; None off SLURM.

    The job id is ``SLURM_ARRAY_JOB_ID_SLURM_ARRAY_TASK_ID`` for array tasks (what submitit
    submits a sweep as), else ``SLURM_JOB_ID``; a multirun appends the job number, since the
    jobs of a sweep launched inside one allocation share the SLURM id. Interactive allocations
    (which Lightning does not requeue) get None: wandb picks a fresh id.
    """
    if not SLURMEnvironment.detect():
        return None
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = (
        f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        if array_job
        else os.environ["SLURM_JOB_ID"]
    )
    parts = [task_name, job]
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        parts.append(str(HydraConfig.get().job.num))
    return "-".join(parts)


def wandb_logger(
    save_dir: str,
    task_name: str,
    project: str = "ldm-lightning",
    tags: Sequence[str] = (),
    offline: bool | None = None,
    group: str | None = None,
    name: str | None = None,
    id: str | None = None,
    **kwargs: Any,
) -> WandbLogger:
    """A :class:`WandbLogger` that is offline without an account (see the module docstring).

    ``group`` and ``name`` default to the experiment's (``task_name``, sweep-aware); ``id``
    defaults to :func:`slurm_run_id` and is resumed if it exists (``resume="allow"``); extra
    ``kwargs`` go to ``WandbLogger`` and ``wandb.init`` (``job_type``, ``log_model``, ...).
    """
    default_group, default_name = run_group_and_name(task_name)
    run_id = id or slurm_run_id(task_name)
    if run_id:
        kwargs = {"id": run_id, "resume": "allow", **kwargs}
    offline = use_offline(offline)
    if offline:
        log.info(
            "wandb runs offline (no API key found; set WANDB_API_KEY or run `wandb login` to "
            "log online); upload later with `wandb sync %s/wandb/offline-run-*`",
            save_dir,
        )
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(
        save_dir=save_dir,
        project=project,
        group=group or default_group,
        name=name or default_name,
        tags=list(tags),
        offline=offline,
        **kwargs,
    )


def finish_wandb() -> None:
    """Close the wandb run even when training raised, so the next run starts clean."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
