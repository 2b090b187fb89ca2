"""Training-loader throughput on Oxford-IIIT Pet-like JPEGs, and the decode pipeline's gain.

Usage (from the repository root)::

    python experiments/bench/loader_throughput.py                 # fake 500x375 JPEGs
    python experiments/bench/loader_throughput.py --root data     # real Oxford-IIIT Pet

1. Images/s of ``PetsDataModule``'s train loader (random crop + flip) at ``--image-size`` with
   each ``--workers`` count, timed after the first batch (worker start-up is reported apart).
2. Our decode (``load_rgb`` with JPEG ``draft`` + one box resample, ``ResizeCrop``) against a
   naive torchvision pipeline (full-size decode, ``Resize(s)``, ``CenterCrop(s)``,
   ``ToTensor``, ``Normalize``) on the same files, one process, for each ``--decode-sizes``;
   the table gives both rates, their ratio and the mean pixel difference in 8-bit levels.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision.transforms as T
from PIL import Image

# Run as a script from anywhere: the fake layout writer lives in the test helpers.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ldm_lightning.data.image_io import load_rgb
from ldm_lightning.data.pets import PetsDataModule
from ldm_lightning.data.transforms import ResizeCrop
from tests.data.fake_layouts import PET_BREEDS, make_fake_pets


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=None,
                        help="folder holding oxford-iiit-pet/ (default: write a fake copy)")
    parser.add_argument("--num-images", type=int, default=384,
                        help="fake images to write (about; rounded up to whole breeds)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--decode-sizes", type=int, nargs="+", default=[256, 128, 64])
    parser.add_argument("--max-decode", type=int, default=384,
                        help="files used by the decode comparison")
    return parser.parse_args()


def loader_rate(datamodule: PetsDataModule, workers: int) -> tuple[float, float, int]:
    """(images/s after the first batch, seconds to the first batch, images after it)."""
    loader = datamodule.loader("train", num_workers=workers, persistent_workers=False)
    start = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    first = time.perf_counter()
    count = sum(batch["image"].shape[0] for batch in iterator)
    return count / (time.perf_counter() - first), first - start, count


def decode_rates(paths: list[Path], size: int) -> tuple[float, float, float]:
    """(ours images/s, naive images/s, mean |ours - naive| in 8-bit levels)."""
    ours_transform = ResizeCrop(size)
    naive_transform = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(),
                                 T.Normalize([0.5] * 3, [0.5] * 3)])
    start = time.perf_counter()
    ours = [ours_transform(load_rgb(path, draft_size=size)) for path in paths]
    middle = time.perf_counter()
    naive = []
    for path in paths:
        with Image.open(path) as image:
            naive.append(naive_transform(image.convert("RGB")))
    end = time.perf_counter()
    difference = torch.stack([(a - b).abs().mean() for a, b in zip(ours, naive)]).mean()
    return len(paths) / (middle - start), len(paths) / (end - middle), float(difference) * 127.5


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        root = args.root
        if root is None:
            root = Path(scratch)
            per_breed = math.ceil(args.num_images / len(PET_BREEDS))
            start = time.perf_counter()
            make_fake_pets(root, n_trainval=per_breed, n_test=1, size=(500, 375), photo=True)
            print(f"wrote {(per_breed + 1) * len(PET_BREEDS)} fake 500x375 JPEGs in "
                  f"{time.perf_counter() - start:.1f} s")
        datamodule = PetsDataModule(str(root), image_size=args.image_size,
                                    batch_size=args.batch_size, download=False)
        start = time.perf_counter()
        datamodule.setup()
        setup_s = time.perf_counter() - start
        n_files = sum(len(datamodule.dataset(split)) for split in ("train", "val", "test"))
        check_us = setup_s / n_files * 1e6
        n_train = len(datamodule.dataset("train"))
        print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
              f"{torch.__version__}, Pillow {Image.__version__}; setup (index + file checks) "
              f"{check_us:.0f} us/image, i.e. {check_us * 3e4 / 1e6:.1f} s for 30k images\n")

        print(f"### Train loader, {args.image_size} px, batch {args.batch_size}, "
              f"{n_train} images\n")
        print("| workers | images/s | start-up s | vs 0 workers |")
        print("|---:|---:|---:|---:|")
        base_rate = None
        for workers in args.workers:
            rate, startup, _ = loader_rate(datamodule, workers)
            base_rate = base_rate or rate
            print(f"| {workers} | {rate:.0f} | {startup:.2f} | {rate / base_rate:.2f}x |")

        chosen = [record.path for record in datamodule.dataset("train").records][: args.max_decode]
        print(f"\n### Decode + resize + crop, one process, {len(chosen)} files\n")
        print("| size | ours (draft + one resize) img/s | naive torchvision img/s | ratio "
              "| mean diff (8-bit levels) |")
        print("|---:|---:|---:|---:|---:|")
        for size in args.decode_sizes:
            ours, naive, difference = decode_rates(chosen, size)
            print(f"| {size} | {ours:.0f} | {naive:.0f} | {ours / naive:.2f}x | "
                  f"{difference:.2f} |")


if __name__ == "__main__":
    main()
