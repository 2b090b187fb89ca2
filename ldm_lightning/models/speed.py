"""Speed switches shared by the stages: ``torch.compile``, channels_last, per-rank noise seeds."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn


def compile_options(compile: bool | dict[str, Any]) -> dict[str, Any] | None:
    """``torch.compile`` keyword arguments for the ``model.compile`` switch; None when off.

    ``true`` compiles with torch's defaults (inductor); a dict passes its keys on, e.g.
    ``{mode: max-autotune}`` or ``{backend: aot_eager}`` (no C++ compiler needed).
    """
    if isinstance(compile, bool):
        return {} if compile else None
    if isinstance(compile, dict):
        return dict(compile)
    raise ValueError(
        f"model.compile={compile!r} is neither a bool nor a dict of torch.compile options; "
        "use true, false or e.g. {mode: max-autotune}."
    )


def apply_speed_switches(
    nets: Iterable[nn.Module], compile: bool | dict[str, Any], channels_last: bool
) -> None:
    """Compile ``nets`` in place and/or store their 4-D weights channels_last (NHWC).

    In-place ``nn.Module.compile`` keeps parameter names, so checkpoints of compiled and eager
    runs are interchangeable. A net that is already compiled is left alone: Lightning calls
    ``configure_model`` again for ``test`` after ``fit``.
    """
    options = compile_options(compile)
    for net in nets:
        if channels_last:
            net.to(memory_format=torch.channels_last)
        if options is not None and getattr(net, "_compiled_call_impl", None) is None:
            net.compile(**options)


def to_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``x [B, C, H, W]`` in channels_last layout when the switch is on (values unchanged)."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def rank_generator(module: pl.LightningModule) -> torch.Generator:
    """A generator on the module's device seeded with ``torch.initial_seed() + global_rank``.

    ``seed_everything`` gives every DDP rank the same seed; noise and timesteps drawn from the
    global generator would then repeat across ranks, and N GPUs would see one noise draw.
    """
    generator = torch.Generator(device=module.device)
    return generator.manual_seed(torch.initial_seed() + module.global_rank)
