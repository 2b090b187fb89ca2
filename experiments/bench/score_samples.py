"""Score a folder of shapes samples (what ``python -m ldm_lightning.sample`` writes) with the
conditioning benchmark's checker (``ldm_lightning.metrics.shapes_checker.read_image``).

A sample is *clean* when the IoU of its shape with the best-fitting clean circle, square or
triangle is above 0.8. Samples written with ``per_class=N`` lie in ``samples/<colour> <shape>/``;
for those the checker also reads whether the shape and colour are the class asked for.
Colours are read among the dataset's six and those the class folders name (a colour taught by
fine-tuning, "orange circle"), or among ``--colours``.

    python experiments/bench/score_samples.py logs/demo/<time>/samples
    python experiments/bench/score_samples.py <run> --colours red green blue yellow orange
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm_lightning.data.shapes import COLOUR_NAMES
from ldm_lightning.metrics.shapes_checker import read_image


def score_folder(
    folder: Path, threshold: float = 0.8, colours: list[str] | None = None
) -> dict[str, float]:
    """Clean share, mean shape IoU and (class folders) shape + colour accuracy of the PNGs, in
    all and (accuracy and clean share) per class, colours read among ``colours`` (None: the
    dataset's and those the class folders name)."""
    paths = sorted((folder / "samples").rglob("*.png"))
    if not paths:
        raise SystemExit(f"no samples/**/*.png under {folder}")
    if colours is None:
        named = [p.parent.name.split(" ")[0] for p in paths if p.parent.name != "samples"]
        colours = list(dict.fromkeys([*COLOUR_NAMES, *named]))
    ious, right, clean_and_right, labelled = [], 0, 0, 0
    per_class: dict[str, list[bool]] = {}
    clean_per_class: dict[str, list[bool]] = {}
    for path in paths:
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
        image = torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1
        read = read_image(image, colours)
        ious.append(read["iou"])
        if path.parent.name != "samples":
            colour, shape = path.parent.name.split(" ")
            labelled += 1
            hit = read["shape"] == shape and read["colour"] == colour
            right += hit
            per_class.setdefault(path.parent.name, []).append(hit)
            clean_per_class.setdefault(path.parent.name, []).append(read["iou"] > threshold)
            clean_and_right += hit and read["iou"] > threshold
    iou = torch.tensor(ious)
    result = {"samples": len(ious), "shape_iou": round(iou.mean().item(), 4),
              "clean": round((iou > threshold).float().mean().item(), 4)}
    if labelled:
        result["shape_and_colour"] = round(right / labelled, 4)
        result["clean_and_right"] = round(clean_and_right / labelled, 4)
        result["per_class"] = {name: round(sum(hits) / len(hits), 4)
                               for name, hits in per_class.items()}
        result["per_class_clean"] = {name: round(sum(hits) / len(hits), 4)
                                     for name, hits in clean_per_class.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", type=Path, nargs="+", help="sample run directories")
    parser.add_argument("--threshold", type=float, default=0.8, help="IoU of a clean shape")
    parser.add_argument("--colours", nargs="+", default=None,
                        help="colours to read among (default: the dataset's and the folders')")
    args = parser.parse_args()
    for folder in args.folders:
        print(folder, json.dumps(score_folder(folder, args.threshold, args.colours)))


if __name__ == "__main__":
    main()
