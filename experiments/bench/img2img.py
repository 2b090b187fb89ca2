"""Image-to-image (SDEdit) at several strengths, and a larger canvas, with a class-conditional
shapes LDM (the demo's): one grid and the checker's reading of every sample.

Rows of ``grid.png``: the init image (a rendered red circle, ``init.png``) edited towards
another class (``--label``, guidance ``--guidance``) at strengths 0, 0.3, 0.6, 0.9 and 1 (the
last: sampling from noise), the init image in the first column. ``canvas_<px>px.png``: samples
of the same class and seed on a canvas of ``--canvas`` px. ``scores.txt``: for each row, the
share of samples the shapes checker (``ldm_lightning.metrics.shapes_checker``) reads as the
asked class, as the init image's class, and as a clean shape (IoU > 0.8).

    python experiments/bench/img2img.py logs/demo/f1/diffusion/checkpoints/last.ckpt \\
        experiments/results/img2img [--label "red circle"]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ldm_lightning.data.shapes import ShapeSpec, label_of, render
from ldm_lightning.metrics.shapes_checker import CLEAN_IOU, read_image
from ldm_lightning.models import LatentDiffusionModule
from ldm_lightning.models.checkpoints import load_stage
from ldm_lightning.utils.images import save_grid, save_png, to_unit

STRENGTHS = (0.0, 0.3, 0.6, 0.9, 1.0)
INIT = ShapeSpec("circle", "red", "gray", centre_x=0.45, centre_y=0.55, radius=0.3)


def reading(images: torch.Tensor, asked: int, init: int) -> str:
    """Shares of ``images`` read as class ``asked``, as class ``init``, and clean."""
    reads = [read_image(image) for image in images]
    classes = [label_of(r["shape"], r["colour"]) for r in reads]
    n = len(reads)
    return (f"asked class {sum(c == asked for c in classes) / n:5.1%}   "
            f"init class {sum(c == init for c in classes) / n:5.1%}   "
            f"clean {sum(r['iou'] > CLEAN_IOU for r in reads) / n:5.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--label", default="blue square", help='"<colour> <shape>"')
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--n", type=int, default=32, help="samples per row scored")
    parser.add_argument("--shown", type=int, default=8, help="samples per row in the grid")
    parser.add_argument("--canvas", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    colour, shape = args.label.split()
    label = label_of(shape, colour)
    model = load_stage(LatentDiffusionModule, args.ckpt, "latent_diffusion").eval()
    size = model.hparams.image_size
    init = render(INIT, size)[None]
    save_png(to_unit(init[0]), args.out / "init.png")
    guided = {"labels": [label] * args.n, "guidance_scale": args.guidance, "seed": args.seed}
    lines = [f"init: {INIT.colour} {INIT.shape}; asked: {colour} {shape}; guidance "
             f"{args.guidance}; {args.n} samples a row, seed {args.seed}; checkpoint {args.ckpt}"]
    rows = []
    for strength in STRENGTHS:
        images = model.sample(n=args.n, init_images=init, strength=strength, **guided)
        lines.append(f"strength {strength:.1f}: {reading(images, label, INIT.label)}")
        rows.append(torch.cat([init, images[: args.shown]]))
    canvas = model.sample(n=args.n, image_size=args.canvas, **guided)
    lines.append(f"{args.canvas} px canvas, no init: {reading(canvas, label, INIT.label)}")
    save_grid(torch.cat(rows), args.out / "grid.png", nrow=args.shown + 1)
    save_grid(canvas[: args.shown], args.out / f"canvas_{args.canvas}px.png", nrow=args.shown)
    (args.out / "scores.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
