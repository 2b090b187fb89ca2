"""Latent normalisation: the one place where latent statistics are estimated and applied.

Diffusion runs on ``z0 = scale * E(x)`` with ``scale = 1 / std(z)`` over all latent entries
(LDM sec. 4.3.2 and appendix G), so the schedule's signal-to-noise ratios mean what they do
for unit-variance pixels; sampling divides by it again before decoding.

:class:`LatentStats` accumulates per-channel first and second moments in float64, one tensor
at a time (a data loader's batches, or a whole latent cache). :class:`LatentNormalizer` turns
them into the normalisation and carries it in a checkpoint (entry ``scale_factor``).

A per-channel normalisation ``z0_c = (E(x)_c - mean_c) / std_c`` plugs in as one more option
of :class:`LatentNormalizer`: ``fit`` keeps ``stats.mean()`` and ``stats.std()`` (already
computed per channel), ``normalize``/``denormalize`` broadcast them over ``[B, C, h, w]``, and
``state``/``load_state`` add two checkpoint entries beside ``scale_factor``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

MIN_VARIANCE = 1e-12  # constant latents: a scale of 1e6, not a division by zero
CHECKPOINT_KEY = "scale_factor"


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

    def std(self) -> Tensor:
        """Per-channel population standard deviation ``[C]`` (float64)."""
        return (self.squares / self.count - self.mean().square()).clamp_min(0).sqrt()

    def inverse_std(self) -> float:
        """``1 / std`` over all entries of all channels: ``Var = E[z^2] - E[z]^2``."""
        total = self.count * len(self.sums)
        variance = self.squares.sum().item() / total - (self.sums.sum().item() / total) ** 2
        return 1.0 / max(variance, MIN_VARIANCE) ** 0.5


class LatentNormalizer:
    """``normalize(z) = scale * z`` and its inverse, with ``scale = 1 / std(z)``.

    Not a module buffer: EMA weight averaging must not average it, and it is saved as the
    checkpoint entry ``scale_factor``. ``scale`` None: not fitted yet.
    """

    def __init__(self, scale: float | None = None) -> None:
        self.scale = float(scale) if scale else None

    @property
    def fitted(self) -> bool:
        return self.scale is not None

    def fit(self, stats: LatentStats) -> LatentNormalizer:
        """Take the scale from the statistics of unnormalised latents; returns self."""
        self.scale = stats.inverse_std()
        return self

    def normalize(self, z: Tensor) -> Tensor:
        """First-stage latents -> the diffusion model's ``z0``."""
        self.check_fitted()
        return z * self.scale

    def denormalize(self, z: Tensor) -> Tensor:
        """The diffusion model's latents -> first-stage latents (what the decoder takes)."""
        self.check_fitted()
        return z / self.scale

    def check_fitted(self) -> None:
        """Raise a RuntimeError that says what to do when the scale is not known yet."""
        if self.scale is None:
            raise RuntimeError(
                "the latent scale factor is unknown: train the model (it is "
                "estimated at the start of fit) or load a trained checkpoint"
            )

    def state(self) -> dict[str, Any]:
        """Checkpoint entries: ``{"scale_factor": float | None}``."""
        return {CHECKPOINT_KEY: self.scale}

    def load_state(self, entries: Mapping[str, Any]) -> None:
        """Take the normalisation from checkpoint ``entries``; kept when they hold none."""
        if entries.get(CHECKPOINT_KEY) is not None:
            self.scale = float(entries[CHECKPOINT_KEY])
