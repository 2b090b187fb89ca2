"""The one way conditions are cycled to a number of samples: ``[a, b]`` to 5 is ``[a, b, a, b, a]``.

The sample CLI cycles its ``labels``/``prompts``, and validation grids and FID cycle the labels
or captions of a real batch. (Guided sampling's ``expand`` in
:mod:`ldm_lightning.models.conditioning` repeats each item instead, one grid row each.)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

__all__ = ["cycle_to"]

T = TypeVar("T")


def cycle_to(values: Iterable[T] | None, n: int) -> list[T] | None:
    """Repeat ``values`` in order until there are ``n`` of them (None stays None)."""
    if values is None:
        return None
    values = list(values)
    if not values:
        raise ValueError("labels/prompts is an empty list; pass at least one, or null")
    return [values[i % len(values)] for i in range(n)]
