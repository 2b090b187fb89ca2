"""Speed switches shared by the stages: ``torch.compile`` (whole nets or their repeated blocks),
channels_last, per-rank noise seeds."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn


def compile_options(compile: bool | dict[str, Any]) -> dict[str, Any] | None:
    """``torch.compile`` keyword arguments for the ``model.compile`` switch; None when off.

    ``true`` compiles with torch's defaults (inductor); a dict passes its keys on, e.g.
    ``{mode: max-autotune}`` or ``{backend: aot_eager}`` (no C++ compiler needed), except
    ``regional`` (:func:`compile_net`).
    """
    if isinstance(compile, bool):
        return {} if compile else None
    if isinstance(compile, dict):
        return dict(compile)
    raise ValueError(
        f"model.compile={compile!r} is neither a bool nor a dict of torch.compile options; "
        "use true, false or e.g. {mode: max-autotune}."
    )


def compile_regions(net: nn.Module) -> list[nn.Module]:
    """The blocks regional compilation compiles: ``net.compile_regions()`` where the net names
    its repeated blocks (the UNet's input, middle and output blocks, the DiT's blocks), else
    ``[net]``."""
    method = getattr(net, "compile_regions", None)
    return [net] if method is None else list(method())


def compile_net(net: nn.Module, options: dict[str, Any]) -> None:
    """``torch.compile`` ``net`` in place with ``options``, or with ``regional: true`` each of
    its :func:`compile_regions` in place (PyTorch's regional compilation recipe).

    Regional compilation compiles small graphs, so compile time is short; the code between
    the blocks (skip concatenations, the timestep embedding) runs eagerly. Blocks of one class
    share the code dynamo compiles, with one cached graph per shape: the regions default to
    ``dynamic: false`` (no switch to dynamic shapes at the second shape) and dynamo's recompile
    limit is raised to the number of regions, which it would otherwise exceed on a UNet (8 by
    default) and leave the remaining blocks eager. A region already compiled is left alone.
    """
    options = dict(options)
    regions = [net]
    if options.pop("regional", False):
        regions = compile_regions(net)
        options.setdefault("dynamic", False)
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(getattr(config, name), len(regions)))
    for region in regions:
        if getattr(region, "_compiled_call_impl", None) is None:
            region.compile(**options)


def apply_speed_switches(
    nets: Iterable[nn.Module], compile: bool | dict[str, Any], channels_last: bool
) -> None:
    """Compile ``nets`` in place (:func:`compile_net`) and/or store their 4-D weights
    channels_last (NHWC).

    In-place ``nn.Module.compile`` keeps parameter names, so checkpoints of compiled and eager
    runs are interchangeable. A net that is already compiled is left alone: Lightning calls
    ``configure_model`` again for ``test`` after ``fit``.
    """
    options = compile_options(compile)
    for net in nets:
        if channels_last:
            net.to(memory_format=torch.channels_last)
        if options is not None:
            compile_net(net, options)


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
