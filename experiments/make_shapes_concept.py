"""Render the few images of a new shapes concept, for few-shot fine-tuning (``+experiment=
shapes_finetune``): ``--count`` images of one shape in one colour (a colour of
``shapes.RENDER_COLOURS``, e.g. ``orange``, which the shapes dataset never draws) on random
backgrounds, sizes and positions, drawn like the dataset's (``shapes.render``).

Writes ``OUT_DIR/<index>.png``; image ``i`` draws from a generator seeded ``(seed, i)``.

    python experiments/make_shapes_concept.py /tmp/orange_circle --colour orange --shape circle
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np

from ldm_lightning.data.shapes import (
    BACKGROUND_COLOURS,
    RENDER_COLOURS,
    SHAPES,
    random_spec,
    render,
)
from ldm_lightning.utils.images import save_png, to_unit


def write_concept(
    out: Path, shape: str, colour: str, count: int = 5, size: int = 32, seed: int = 0
) -> list[Path]:
    """Render ``count`` images of a ``colour`` ``shape`` into ``out``; returns their paths."""
    if shape not in SHAPES or colour not in RENDER_COLOURS:
        raise SystemExit(f"shape must be one of {SHAPES}, colour one of {tuple(RENDER_COLOURS)}")
    backgrounds = [name for name in BACKGROUND_COLOURS if name != colour]
    paths = []
    for index in range(count):
        rng = np.random.default_rng((seed, index))
        spec = replace(random_spec(rng), shape=shape, colour=colour,
                       background=backgrounds[rng.integers(len(backgrounds))])
        paths.append(save_png(to_unit(render(spec, size)), out / f"{index}.png"))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", default="circle")
    parser.add_argument("--colour", default="orange")
    parser.add_argument("--count", type=int, default=5)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    paths = write_concept(args.out, args.shape, args.colour, args.count, args.size, args.seed)
    print(f"wrote {len(paths)} images to {args.out}")


if __name__ == "__main__":
    main()
