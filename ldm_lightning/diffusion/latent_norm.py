"""Latent normalisation: the one place where latent statistics are estimated and applied.

Diffusion runs on normalised latents ``z0 = (E(x) - shift) * scale`` so that the schedule's
signal-to-noise ratios mean what they do for unit-variance pixels; sampling inverts it before
decoding (``E(x) = z0 / scale + shift``). Two modes:

- ``"scalar"`` (LDM sec. 4.3.2 and appendix G): ``z0 = E(x) / std(z)``, one ``std`` over all
  latent entries of all channels (shift 0, ``scale = 1 / std``, the checkpoint's
  ``scale_factor``).
- ``"channel"``: ``z0_c = (E(x)_c - mean_c) / std_c``, each channel ``c`` centred and scaled by
  its own mean and population std, for first stages whose channels differ in offset and spread
  (shift ``mean_c``, ``scale = 1 / std_c``, broadcast over ``[B, C, ...]``).

A variance below ``MIN_VARIANCE`` (a constant channel or latent) is taken as ``MIN_VARIANCE``:
a large scale, not a division by zero.

:class:`LatentStats` accumulates per-channel first and second moments in float64, one tensor
at a time (a data loader's batches, or a whole latent cache). :class:`LatentNormalizer` turns
them into the normalisation and carries it in a checkpoint (entries ``latent_norm``,
``scale_factor``, ``latent_mean``, ``latent_std``; checkpoints with only ``scale_factor`` are
scalar).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

MIN_VARIANCE = 1e-12  # constant latents: a scale of 1e6, not a division by zero
MODES = ("scalar", "channel")
MODE_KEY = "latent_norm"
CHECKPOINT_KEY = "scale_factor"
MEAN_KEY = "latent_mean"
STD_KEY = "latent_std"


@dataclass
class LatentStats:
    """Per-channel sums of ``z`` and ``z^2`` and the count of entries per channel (float64).

    ``sums`` and ``squares`` are ``[C]``; ``count`` is the number of entries of each channel.
    """

    sums: Tensor
    squares: Tensor
    count: int

    @classmethod
    def of(cls, latents: Iterable[Tensor]) -> LatentStats:
        """Statistics of every tensor ``[B, C, ...]`` of ``latents`` (each read once)."""
        stats = None
        for z in latents:
            z = z.detach().double()
            dims = (0, *range(2, z.ndim))
            batch = cls(
                z.sum(dim=dims).cpu(), z.square().sum(dim=dims).cpu(), z.numel() // z.shape[1]
            )
            stats = batch if stats is None else stats + batch
        if stats is None:
            raise ValueError("cannot estimate latent statistics: no batches (empty dataset?)")
        return stats

    @classmethod
    def from_moments(cls, mean: Tensor, std: Tensor, count: int) -> LatentStats:
        """Back from per-channel ``mean`` and population ``std`` ``[C]`` over ``count`` each."""
        mean, std = mean.double(), std.double()
        return cls(mean * count, (std.square() + mean.square()) * count, count)

    def __add__(self, other: LatentStats) -> LatentStats:
        return LatentStats(
            self.sums + other.sums, self.squares + other.squares, self.count + other.count
        )

    def mean(self) -> Tensor:
        """Per-channel mean ``[C]`` (float64)."""
        return self.sums / self.count

    def variance(self) -> Tensor:
        """Per-channel population variance ``E[z_c^2] - E[z_c]^2`` ``[C]`` (float64, >= 0)."""
        return (self.squares / self.count - self.mean().square()).clamp_min(0)

    def std(self) -> Tensor:
        """Per-channel population standard deviation ``[C]`` (float64)."""
        return self.variance().sqrt()

    def floored_std(self) -> Tensor:
        """Per-channel ``sqrt(max(Var_c, MIN_VARIANCE))`` ``[C]`` (float64): what channel
        normalisation divides by."""
        return self.variance().clamp_min(MIN_VARIANCE).sqrt()

    def inverse_std(self) -> float:
        """``1 / std`` over all entries of all channels: ``Var = E[z^2] - E[z]^2``."""
        total = self.count * len(self.sums)
        variance = self.squares.sum().item() / total - (self.sums.sum().item() / total) ** 2
        return 1.0 / max(variance, MIN_VARIANCE) ** 0.5


class LatentNormalizer:
    """``normalize(z) = (z - shift) * scale`` and its inverse, in ``mode`` "scalar" or "channel"
    (see the module docstring).

    Not a module buffer: EMA weight averaging must not average it, and it is saved as checkpoint
    entries (:meth:`state`). ``scale`` is the scalar mode's ``1 / std(z)`` (None in channel
    mode); ``mean`` and ``std`` the channel mode's ``[C]`` lists of floats (None in scalar
    mode). Nothing set: not fitted yet.

    Args:
        scale: a fixed scalar scale (scalar mode only); None (or 0) estimates it in :meth:`fit`.
        mode: "scalar" | "channel".
    """

    def __init__(self, scale: float | None = None, mode: str = "scalar") -> None:
        if mode not in MODES:
            raise ValueError(f"latent_norm={mode!r} is unknown; valid: {MODES}")
        self.mode = mode
        self.scale = float(scale) if scale else None
        if self.scale is not None and mode == "channel":
            raise ValueError(
                f"scale_factor={self.scale} is a fixed scalar scale, but latent_norm='channel' "
                "estimates a mean and std per channel from the data: leave scale_factor unset "
                "(model.scale_factor=null), or keep the fixed scale with latent_norm='scalar'"
            )
        self.mean: list[float] | None = None
        self.std: list[float] | None = None

    @property
    def fitted(self) -> bool:
        return self.scale is not None if self.mode == "scalar" else self.mean is not None

    def fit(self, stats: LatentStats) -> LatentNormalizer:
        """Take the normalisation from the statistics of unnormalised latents; returns self."""
        if self.mode == "scalar":
            self.scale = stats.inverse_std()
        else:
            self.mean, self.std = stats.mean().tolist(), stats.floored_std().tolist()
        return self

    def normalize(self, z: Tensor) -> Tensor:
        """First-stage latents ``[B, C, ...]`` -> the diffusion model's ``z0``."""
        shift, scale = self.affine(z)
        return (z - shift) * scale

    def denormalize(self, z: Tensor) -> Tensor:
        """The diffusion model's latents ``[B, C, ...]`` -> first-stage latents (what the
        decoder takes)."""
        shift, scale = self.affine(z)
        return z / scale + shift

    def affine(self, z: Tensor) -> tuple[Tensor | float, Tensor | float]:
        """``(shift, scale)`` of ``z0 = (z - shift) * scale`` for latents ``z`` ``[B, C, ...]``:
        floats (scalar mode) or ``[1, C, 1, ...]`` tensors on ``z``'s device and dtype."""
        self.check_fitted()
        if self.mode == "scalar":
            return 0.0, self.scale
        if len(self.mean) != z.shape[1]:
            raise ValueError(
                f"the latent normalisation has {len(self.mean)} channels, but the latents "
                f"{tuple(z.shape)} have {z.shape[1]}"
            )
        shape = (1, -1, *(1,) * (z.ndim - 2))
        shift = torch.tensor(self.mean, dtype=torch.float64).view(shape)
        scale = 1.0 / torch.tensor(self.std, dtype=torch.float64).view(shape)
        return shift.to(z.device, z.dtype), scale.to(z.device, z.dtype)

    def check_fitted(self) -> None:
        """Raise a RuntimeError that says what to do when the normalisation is not known yet."""
        if not self.fitted:
            what = "scale factor" if self.mode == "scalar" else "per-channel mean and std"
            raise RuntimeError(
                f"the latent {what} is unknown: train the model (it is "
                "estimated at the start of fit) or load a trained checkpoint"
            )

    def summary(self) -> dict[str, float]:
        """The fitted normalisation as named numbers (for logs): ``{"scale_factor": s}``, or
        ``{"latent_mean/c": mean_c, "latent_std/c": std_c}`` for every channel ``c``."""
        self.check_fitted()
        if self.mode == "scalar":
            return {CHECKPOINT_KEY: self.scale}
        return {
            **{f"{MEAN_KEY}/{c}": m for c, m in enumerate(self.mean)},
            **{f"{STD_KEY}/{c}": s for c, s in enumerate(self.std)},
        }

    def state(self) -> dict[str, Any]:
        """Checkpoint entries: ``{"latent_norm": mode, "scale_factor": float | None,
        "latent_mean": list | None, "latent_std": list | None}``."""
        return {MODE_KEY: self.mode, CHECKPOINT_KEY: self.scale, MEAN_KEY: self.mean,
                STD_KEY: self.std}

    def load_state(self, entries: Mapping[str, Any]) -> None:
        """Take the normalisation from checkpoint ``entries``; kept when they hold none.

        Entries without ``latent_norm`` (checkpoints written before the channel mode) are
        scalar. A fitted normalisation in the entries wins over this one's mode: it is what the
        weights were trained on (a warning says so when the modes differ).
        """
        mode = entries.get(MODE_KEY) or "scalar"
        if mode not in MODES:
            raise ValueError(f"the checkpoint's latent_norm={mode!r} is unknown; valid: {MODES}")
        values = entries.get(CHECKPOINT_KEY if mode == "scalar" else MEAN_KEY)
        if values is None:
            return
        if mode != self.mode:
            log.warning(
                "the checkpoint's latent normalisation is %r, what its weights were trained on; "
                "using it instead of %r", mode, self.mode,
            )
        self.mode = mode
        if mode == "scalar":
            self.scale, self.mean, self.std = float(values), None, None
        else:
            self.scale = None
            self.mean = [float(m) for m in values]
            self.std = [float(s) for s in entries[STD_KEY]]

    def __repr__(self) -> str:
        if not self.fitted:
            return f"LatentNormalizer({self.mode}, not fitted)"
        numbers = ", ".join(f"{name}={value:.5f}" for name, value in self.summary().items())
        return f"LatentNormalizer({self.mode}, {numbers})"
