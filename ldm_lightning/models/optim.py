"""Learning-rate rules shared by the stages."""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch

from ldm_lightning.models.handshake import DataUser
from ldm_lightning.utils.targets import resolve_class

log = logging.getLogger(__name__)


def scaled_learning_rate(module: DataUser, base_lr: float, scale_lr: bool) -> float:
    """CompVis' rule: ``lr = base_lr * batch * devices * nodes * accumulate`` when ``scale_lr``.

    Keeps the per-sample step size fixed when the global batch grows (LDM's configs state
    ``base_learning_rate``; main.py multiplies it out). Without a trainer, ``base_lr``. The
    batch is the connected datamodule's (:func:`~ldm_lightning.models.handshake.connect`).
    """
    if not scale_lr or module._trainer is None:
        return float(base_lr)
    trainer = module.trainer
    batch = module.data_source("model.optimizer.scale_lr=true (it scales by the batch)").batch_size
    scale = batch * trainer.num_devices * trainer.num_nodes * trainer.accumulate_grad_batches
    return float(base_lr) * scale


SCHEDULES = ("constant", "cosine", "linear")


def lr_factor(
    step: int, warmup_steps: int, total_steps: int, schedule: str = "constant",
    min_lr_ratio: float = 0.0,
) -> float:
    """Multiplier on the base rate after ``step`` optimizer steps.

    A linear warm-up ``(step + 1) / warmup_steps`` over the first ``warmup_steps`` steps, then:

    - ``constant``: 1;
    - ``cosine``: ``r + (1 - r) * (1 + cos(pi * p)) / 2`` (SGDR, Loshchilov & Hutter 2017,
      eq. 5, one cycle without restarts);
    - ``linear``: ``r + (1 - r) * (1 - p)``;

    where ``p = (step - warmup_steps) / (total_steps - warmup_steps)``, clamped to [0, 1], and
    ``r = min_lr_ratio``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; valid: {SCHEDULES}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(max((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0), 1.0)
    decay = (1 + math.cos(math.pi * progress)) / 2 if schedule == "cosine" else 1 - progress
    return min_lr_ratio + (1 - min_lr_ratio) * decay


def schedule_lambda(module: pl.LightningModule, cfg: dict[str, Any]) -> Callable[[int], float]:
    """:func:`lr_factor` for ``cfg`` (``warmup_steps``, ``schedule``, ``min_lr_ratio``), the
    decay spread over the trainer's ``estimated_stepping_batches`` (batches, for manual
    optimisation)."""
    schedule = cfg.get("schedule", "constant")
    warmup = max(int(cfg.get("warmup_steps", 0)), 0)
    min_ratio = float(cfg.get("min_lr_ratio", 0.0))
    lr_factor(0, warmup, 1, schedule, min_ratio)  # fail at start on an unknown schedule
    total = 1
    if schedule != "constant" and module._trainer is not None:
        estimate = module.trainer.estimated_stepping_batches
        if not math.isfinite(estimate):
            raise ValueError(
                f"model.optimizer.schedule={schedule} needs a known run length: set "
                "trainer.max_epochs or trainer.max_steps (the decay is spread over it). A "
                "wall-clock budget alone (trainer.max_time) gives none: use "
                "model.optimizer.schedule=constant there (as +experiment=shapes_compare does)."
            )
        total = int(estimate)
    return lambda step: lr_factor(step, warmup, total, schedule, min_ratio)


RATE_KEYS = ("base_lr", "scale_lr", "warmup_steps", "schedule", "min_lr_ratio")
HINT = (
    "set model.optimizer._target_ to a torch.optim.Optimizer subclass (e.g. torch.optim.AdamW, "
    "torch.optim.SGD) with the arguments it takes"
)


def optimizer_settings(settings: Mapping[str, Any] | None, defaults: Mapping[str, Any]) -> dict:
    """``settings`` completed by ``defaults`` (a ``_target_``, its arguments and rate keys).

    Settings without ``_target_`` (checkpoints of before it) are the defaults' class. Another
    class than the defaults' takes only the defaults' rate keys (:data:`RATE_KEYS`), not their
    arguments (SGD has no ``betas``).
    """
    settings = dict(settings or {})
    target = settings.setdefault("_target_", defaults["_target_"])
    inherited = {
        k: v for k, v in defaults.items() if target == defaults["_target_"] or k in RATE_KEYS
    }
    return {"scale_lr": False, **inherited, **settings}


def clips_gradients(module: pl.LightningModule) -> bool:
    """Whether gradients are clipped: ``trainer.gradient_clip_val`` or the module's own
    ``gradient_clip_val`` (manual optimisation)."""
    trainer_clip = module._trainer is not None and module.trainer.gradient_clip_val
    return bool(trainer_clip or module.hparams.get("gradient_clip_val"))


def wants_fused(cls: type, devices: set[str], clipping: bool, arguments: Mapping) -> bool:
    """Whether to build ``cls`` with ``fused=True``: one kernel for the whole update of a step
    instead of torch's default ``foreach`` (a few per group of parameters).

    Yes when the class takes ``fused`` (Adam, AdamW, SGD, ...), every parameter is on a CUDA
    device, the config sets neither ``fused`` nor ``foreach`` (``+model.optimizer.fused=false``
    turns it off) and gradients are not clipped: Lightning refuses to clip the gradients of a
    fused optimiser under mixed precision, which unscales inside its step.
    """
    takes = "fused" in inspect.signature(cls).parameters
    chosen = "fused" in arguments or "foreach" in arguments
    return takes and devices == {"cuda"} and not chosen and not clipping


def build_optimizer(
    module: pl.LightningModule,
    params: Iterable[torch.nn.Parameter],
    settings: Mapping[str, Any] | None,
    defaults: Mapping[str, Any],
) -> tuple[torch.optim.Optimizer, dict[str, Any]]:
    """The optimiser of ``settings`` on ``params`` and its Lightning scheduler dict.

    ``settings`` (``model.optimizer``, see :func:`optimizer_settings` for ``defaults``) name
    the class with ``_target_`` (``_partial_: true``: the parameters and rate are given here),
    resolved by :func:`~ldm_lightning.utils.targets.resolve_class`; the rate keys
    (:data:`RATE_KEYS`) set its rate, :func:`scaled_learning_rate` times :func:`lr_factor`: it
    rises linearly from ``1/warmup_steps`` of it to all of it over the first ``warmup_steps``
    optimizer steps, then stays (``constant``) or decays to ``min_lr_ratio`` of it by the end
    of training. The other keys (``betas``, ``weight_decay``, ...) are the class's arguments
    (YAML lists as tuples). On CUDA the fused kernel is chosen where :func:`wants_fused` says.
    """
    cfg = optimizer_settings(settings, defaults)
    rates = {k: cfg.pop(k) for k in RATE_KEYS if k in cfg}
    cfg.pop("_partial_", None)
    cls = resolve_class(cfg.pop("_target_"), torch.optim.Optimizer, "torch optimizer", HINT)
    arguments = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    lr = scaled_learning_rate(module, rates["base_lr"], rates["scale_lr"])
    params = list(params)
    tensors = [p for g in params for p in (g["params"] if isinstance(g, Mapping) else [g])]
    devices = {p.device.type for p in tensors}
    clipping = devices == {"cuda"} and clips_gradients(module)  # asked only where it matters
    if wants_fused(cls, devices, clipping, arguments):
        arguments["fused"] = True
    log.info("%s: %s%s, learning rate %.3g", type(module).__name__, cls.__name__,
             " (fused)" if arguments.get("fused") else "", lr)
    try:
        optimizer = cls(params, lr=lr, **arguments)
    except TypeError as error:
        raise ValueError(f"model.optimizer: {cls.__name__} {error}; {HINT}") from error
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_lambda(module, rates))
    return optimizer, {"scheduler": scheduler, "interval": "step"}
