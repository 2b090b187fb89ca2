"""Image-to-image by SDEdit (Meng et al. 2022, "SDEdit: guided image synthesis and editing with
stochastic differential equations", sec. 3 and Algorithm 1): noise a clean ``x0`` to an
intermediate level t0, ``x(t0) = alpha(t0) x0 + sigma(t0) eps`` (a draw of q(x_t0 | x0)), and run
the reverse process from there. The larger t0, the more of the image the sampler regenerates:
t0 trades faithfulness to ``x0`` for realism (their sec. 3, Fig. 3).

``strength`` in [0, 1] chooses t0 on the sampler's own grid of n levels, as diffusers' img2img
pipelines do: the sampler walks the last k = ceil(strength n) of them (so every strength > 0
takes at least one step; diffusers rounds down), and t0 is the first kept one.

- strength 0: no step, the result is ``x0`` itself (for an LDM, the autoencoder's
  reconstruction D(E(x))).
- strength 1: the whole grid from pure noise ``eps * initial_scale``, exactly what
  :func:`~ldm_lightning.diffusion.sample` draws without an image (same seed, same numbers):
  the image is forgotten. (Noising ``x0`` to the grid's first level instead would keep a trace
  of it, alpha(t0) x0, wherever that level is not pure noise: DDPM's abar_T > 0, EDM's
  sigma_max < inf.)

Every process and sampler of :mod:`ldm_lightning.diffusion` works: the grid and the levels are
the process's, and the first noise is the first draw of the sampling generator, as x_T is.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor

from ldm_lightning.diffusion.processes import NoiseLevel


def check_strength(strength: float) -> None:
    """Refuse a ``strength`` outside [0, 1]."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(
            f"strength must be in [0, 1] (0: the image unchanged, 1: pure noise), got {strength}"
        )


def kept_levels(levels: list[NoiseLevel], strength: float) -> list[NoiseLevel]:
    """The tail of a sampling grid (n levels, then the clean end) that image-to-image walks: the
    last k = ceil(strength n) levels and the clean end. ``strength n`` is rounded to 9 decimals
    first, so that 0.6 of 50 steps is 30, not 31 (0.6 * 50 = 30.000000000000004)."""
    check_strength(strength)
    n = len(levels) - 1
    k = math.ceil(round(strength * n, 9))
    return levels[n - k:]


def starting_point(
    x0: Tensor | None,
    level: NoiseLevel,
    strength: float,
    noise: Callable[[], Tensor],
    initial_scale: float,
) -> Tensor:
    """Where the reverse process starts, at the first kept ``level``: pure noise
    ``noise() * initial_scale`` without an image (``x0`` None) or at strength 1; ``x0`` itself at
    the clean level (strength 0, no draw); else SDEdit's ``alpha x0 + sigma noise()``.

    ``x0`` [B, ...] is the clean data (an LDM's normalised latents), ``noise()`` draws eps of its
    shape."""
    if x0 is None or strength == 1.0:
        return noise() * initial_scale
    if level.clean:
        return x0
    return level.alpha * x0 + level.sigma * noise()
