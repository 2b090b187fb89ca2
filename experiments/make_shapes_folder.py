"""Write the shapes dataset as an image folder with semantic maps: the layout a user's own
folder takes for ``+experiment=folder_semantic`` (and every other ``folder_*`` experiment).

Writes ``OUT/images/<colour shape>/<index>.png`` (``--count`` images of the training split,
``--size`` px) and ``OUT/maps/<colour shape>/<index>.png``: one-channel PNGs of class indices,
0 background, 1 shape (the dataset's exact ``segmentation``).

    python experiments/make_shapes_folder.py /tmp/shapes_folder --count 4000
    python -m ldm_lightning.train +experiment=folder_semantic data.root=/tmp/shapes_folder/images \
        data.segmentation_dir=/tmp/shapes_folder/maps model.spatial.num_classes=2 \
        model.first_stage.ckpt_path=<autoencoder ckpt>
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from ldm_lightning.data.shapes import ShapesDataset
from ldm_lightning.utils.images import save_png, to_unit


def write_folder(out: Path, count: int, size: int = 32, seed: int = 0) -> tuple[Path, Path]:
    """The images and maps folders under ``out``."""
    dataset = ShapesDataset(count, size, split="train", seed=seed)
    images, maps = out / "images", out / "maps"
    for index in range(count):
        spec, item = dataset.spec(index), dataset[index]
        name = f"{spec.colour} {spec.shape}/{index}.png"
        save_png(to_unit(item["image"]), images / name)
        (maps / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(item["segmentation"].numpy().astype(np.uint8), "L").save(maps / name)
    return images, maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=4000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    images, maps = write_folder(args.out, args.count, args.size, args.seed)
    print(f"wrote {args.count} images to {images} and their maps to {maps}")


if __name__ == "__main__":
    main()
