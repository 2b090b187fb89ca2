"""Score generated class-conditional samples of a folder against the real folder.

Three numbers, all offline, for ``samples/<class name>/*.png`` (``ldm_lightning.sample
per_class=N``, or the pipeline's ``samples/samples``) against the real class folder:

- **classifier accuracy**: a small CNN is trained on the real folder (80%, seeded stratified
  split of ``ImageFolderDataModule``; light random affine augmentation) and reports its accuracy
  on the held-out 20% (``real_accuracy``: the ceiling, so the sample accuracy can be read) and
  on the samples, whose folder name is their true class (``sample_accuracy``, per class too).
  Chance is 1/K.
- **Fréchet distance** between Gaussians fitted to that classifier's penultimate features
  (``FEATURES``-d) of the held-out real images and of the samples (``fid.frechet_distance``,
  the closed form FID uses; not comparable to an Inception FID). ``frechet_real_floor`` is the
  same distance for real images instead of samples: a random subset of the held-out images
  with the samples' class counts (at most half of each class) against the rest of them (mean
  of ``FLOOR_DRAWS`` draws, and their std), what sampling noise alone gives at about the
  samples' set size; samples as good as real images score about the floor (or a little
  below: they are compared with all the held-out images). The distance is biased upwards at
  small N and noisy (32-d Gaussians from ~100 images), so compare runs at equal sample
  counts and read differences smaller than the floor's std as noise; more samples per class
  (``pipeline.sample.per_class=30``) steady it.
- **high-frequency energy**: the fraction of a grayscale image's spectral energy (mean removed)
  at radial frequencies above half-Nyquist (> 0.25 cycles/pixel), averaged over images;
  ``hf_ratio = hf_samples / hf_real``: 1.0 is as smooth as the real images, > 1 means noise or
  grain the real images lack (white noise: ~0.8 / hf_real), < 1 blurrier than real.

    python experiments/bench/folder_quality.py --real /tmp/digits \
        --samples logs/pipelines/folder_ldm_class/samples/samples --out report.json

Images are read with ``ldm_lightning.data`` (``ImageFolderDataModule`` records, ``ResizeCrop``
to ``--image-size``), so unreadable files are skipped with a warning as in training.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ldm_lightning.data.image_folder import ImageFolderDataModule
from ldm_lightning.data.image_io import build_dataset
from ldm_lightning.data.transforms import ResizeCrop
from ldm_lightning.metrics.fid import frechet_distance, gaussian_statistics

FEATURES = 32
FLOOR_DRAWS = 5
HOLDOUT = 0.2
HALF_NYQUIST = 0.25  # cycles per pixel
_LUMA = torch.tensor([0.299, 0.587, 0.114])


# ---------------------------------------------------------------------- images
def _stack(dataset: Dataset) -> tuple[Tensor, Tensor]:
    """``(images [N, 3, S, S] in [-1, 1], labels [N])`` of an ``ImageRecordDataset``."""
    images, labels = [], []
    for batch in DataLoader(dataset, batch_size=256, shuffle=False):
        images.append(batch["image"])
        labels.append(batch["label"])
    return torch.cat(images), torch.cat(labels)


def load_real(
    root: str | Path, image_size: int, seed: int = 0
) -> tuple[list[str], tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``(class names, (train images, labels), (held-out images, labels))`` of a class folder:
    the datamodule's seeded stratified split with ``val_fraction = HOLDOUT``, un-augmented."""
    datamodule = ImageFolderDataModule(
        str(root), image_size=image_size, val_fraction=HOLDOUT, seed=seed
    )
    if not datamodule.class_names:
        raise ValueError(f"{root} has no class folders; the classifier needs <class name>/ folders")
    train = _stack(datamodule.build_split("train", augment=False))
    held_out = _stack(datamodule.build_split("val", augment=False))
    return datamodule.class_names, train, held_out


def load_samples(
    root: str | Path, class_names: Sequence[str], image_size: int
) -> tuple[Tensor, Tensor]:
    """``(images, labels)`` of ``root/<class name>/*.png``, labels in ``class_names``' order."""
    datamodule = ImageFolderDataModule(str(root), image_size=image_size)
    names = datamodule.class_names
    unknown = sorted(set(names) - set(class_names))
    if not names or unknown:
        raise ValueError(
            f"the samples in {root} must be in class folders named like the real ones "
            f"({', '.join(class_names)}); "
            + (f"unknown: {', '.join(unknown)}" if unknown else "found no class folders")
        )
    index = {name: label for label, name in enumerate(class_names)}
    records = [replace(record, label=index[names[record.label]]) for record in datamodule.records]
    dataset = build_dataset(records, ResizeCrop(image_size), "skip", where=f"samples {root}")
    return _stack(dataset)


# ---------------------------------------------------------------------- classifier
class SmallCNN(nn.Module):
    """Three conv blocks (16, 32, 64 channels; BN, ReLU, 2x2 pool) -> FEATURES -> ReLU -> K."""

    def __init__(self, num_classes: int, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for out in (width, 2 * width, 4 * width):
            layers += [
                nn.Conv2d(channels, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = out
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.features = nn.Linear(4 * channels, FEATURES)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(FEATURES, num_classes))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``images [B, 3, S, S]`` in [-1, 1] -> ``(features [B, FEATURES], logits [B, K])``;
        the features are the penultimate layer before its ReLU (no dead, constant dimensions)."""
        features = self.features(self.body(images))
        return features, self.head(features)


def _augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """Random rotation (+-10 deg), scale (0.9-1.1) and shift (+-10%) per image, border pad."""
    n = images.shape[0]
    uniform = torch.rand(n, 4, generator=generator) * 2 - 1
    angle = uniform[:, 0] * math.radians(10)
    scale = 1 + 0.1 * uniform[:, 1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, 0.2 * uniform[:, 2]], 1),
         torch.stack([sin, cos, 0.2 * uniform[:, 3]], 1)], 1
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="border", align_corners=False)


def train_classifier(
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
) -> SmallCNN:
    """A :class:`SmallCNN` trained with AdamW and a cosine schedule; seeded, returned in eval."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = SmallCNN(num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(images) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch_size):
            batch = order[start : start + batch_size]
            if len(batch) < 2:  # BatchNorm needs two
                continue
            _, logits = model(_augment(images[batch], generator))
            loss = F.cross_entropy(logits, labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def predict(model: SmallCNN, images: Tensor) -> tuple[Tensor, Tensor]:
    """``(features [N, FEATURES], predicted labels [N])``."""
    features, predictions = [], []
    for chunk in images.split(256):
        f, logits = model(chunk)
        features.append(f)
        predictions.append(logits.argmax(1))
    return torch.cat(features), torch.cat(predictions)


def accuracy(predictions: Tensor, labels: Tensor, class_names: Sequence[str]) -> dict[str, Any]:
    """``{"accuracy", "count", "per_class": {name: {"accuracy", "count"}}}`` (classes present)."""
    per_class = {}
    for label, name in enumerate(class_names):
        mask = labels == label
        if mask.any():
            per_class[name] = {
                "accuracy": float((predictions[mask] == label).float().mean()),
                "count": int(mask.sum()),
            }
    return {
        "accuracy": float((predictions == labels).float().mean()),
        "count": len(labels),
        "per_class": per_class,
    }


# ---------------------------------------------------------------------- distances
def frechet(features_a: Tensor, features_b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N, D]``."""
    if len(features_a) < 2 or len(features_b) < 2:
        raise ValueError("the Fréchet distance needs at least 2 images in each set")
    mu_a, sigma_a = gaussian_statistics(features_a.double().numpy())
    mu_b, sigma_b = gaussian_statistics(features_b.double().numpy())
    return max(0.0, frechet_distance(mu_a, sigma_a, mu_b, sigma_b))


def high_frequency_fraction(images: Tensor, cutoff: float = HALF_NYQUIST) -> Tensor:
    """Per image ``[N]``: the share of the grayscale power spectrum (DC removed) at radial
    frequencies above ``cutoff`` cycles/pixel (0.5 is Nyquist). A flat image gives 0."""
    gray = torch.einsum("nchw,c->nhw", (images.double() + 1) / 2, _LUMA.double())
    gray = gray - gray.mean(dim=(1, 2), keepdim=True)
    power = torch.fft.fft2(gray).abs().square()
    fy = torch.fft.fftfreq(gray.shape[1], dtype=torch.float64)
    fx = torch.fft.fftfreq(gray.shape[2], dtype=torch.float64)
    high = (fy[:, None].square() + fx[None, :].square()).sqrt() > cutoff
    total = power.sum(dim=(1, 2))
    return torch.where(total > 0, power[:, high].sum(1) / total.clamp_min(1e-30), 0.0)


def frechet_real_floor(
    features: Tensor,
    labels: Tensor,
    sample_labels: Tensor,
    draws: int = FLOOR_DRAWS,
    seed: int = 0,
) -> tuple[float, float]:
    """What sampling alone gives: mean and std over ``draws`` of the Fréchet distance between
    a random subset of the real set with the samples' class counts (at most half of each
    class) and the rest of the real set. Drawn per class: subsets with another class mix
    than the samples' would move a class-separating feature space's mean a lot."""
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(draws):
        subset, rest = [], []
        for label in labels.unique():
            members = (labels == label).nonzero().flatten()
            members = members[torch.randperm(len(members), generator=generator)]
            count = min(int((sample_labels == label).sum()), len(members) // 2)
            subset.append(members[:count])
            rest.append(members[count:])
        values.append(frechet(features[torch.cat(subset)], features[torch.cat(rest)]))
    return float(np.mean(values)), float(np.std(values))


# ---------------------------------------------------------------------- report
def score(
    real: str | Path,
    samples: str | Path,
    image_size: int = 32,
    epochs: int = 30,
    seed: int = 0,
) -> dict[str, Any]:
    """Train the classifier on ``real`` and score ``samples`` (see the module docstring)."""
    start = time.perf_counter()
    class_names, (train_x, train_y), (held_x, held_y) = load_real(real, image_size, seed)
    sample_x, sample_y = load_samples(samples, class_names, image_size)
    loaded = time.perf_counter()
    model = train_classifier(train_x, train_y, len(class_names), epochs=epochs, seed=seed)
    trained = time.perf_counter()
    held_features, held_predictions = predict(model, held_x)
    sample_features, sample_predictions = predict(model, sample_x)
    floor, floor_std = frechet_real_floor(held_features, held_y, sample_y, seed=seed)
    hf_real = float(high_frequency_fraction(held_x).mean())
    hf_samples = float(high_frequency_fraction(sample_x).mean())
    return {
        "real": str(real),
        "samples": str(samples),
        "image_size": image_size,
        "num_classes": len(class_names),
        "chance": 1 / len(class_names),
        "num_train": len(train_x),
        "num_real_held_out": len(held_x),
        "num_samples": len(sample_x),
        "real_accuracy": accuracy(held_predictions, held_y, class_names),
        "sample_accuracy": accuracy(sample_predictions, sample_y, class_names),
        "frechet": frechet(held_features, sample_features),
        "frechet_real_floor": floor,
        "frechet_real_floor_std": floor_std,
        "hf_real": hf_real,
        "hf_samples": hf_samples,
        "hf_ratio": hf_samples / hf_real if hf_real > 0 else float("inf"),
        "seconds": {"load": loaded - start, "train_classifier": trained - loaded,
                    "total": time.perf_counter() - start},
        "settings": {"epochs": epochs, "seed": seed, "threads": torch.get_num_threads(),
                     "holdout": HOLDOUT, "features": FEATURES,
                     "hf_cutoff_cycles_per_pixel": HALF_NYQUIST},
    }


def format_report(report: dict[str, Any]) -> str:
    real, samples = report["real_accuracy"], report["sample_accuracy"]
    lines = [
        f"classifier: {report['num_train']} real images, {report['num_classes']} classes "
        f"(chance {report['chance']:.3f}), trained in "
        f"{report['seconds']['train_classifier']:.1f} s",
        f"accuracy   real held-out {real['accuracy']:.3f} (n={real['count']})   "
        f"samples {samples['accuracy']:.3f} (n={samples['count']})",
        "  per class (samples): " + ", ".join(
            f"{name} {entry['accuracy']:.2f}" for name, entry in samples["per_class"].items()
        ),
        f"frechet    samples vs real held-out {report['frechet']:.3f}   "
        f"(real vs real, same counts: {report['frechet_real_floor']:.3f} "
        f"+- {report['frechet_real_floor_std']:.3f})",
        f"hf energy  samples {report['hf_samples']:.4f}   real {report['hf_real']:.4f}   "
        f"ratio {report['hf_ratio']:.2f} (1 = as smooth as real; > 1 noisier)",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", required=True, type=Path, help="real folder <class>/<image>")
    parser.add_argument("--samples", required=True, type=Path,
                        help="generated samples <class>/<image>, class names as in --real")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: the small CNN gains little from more, and on "
                             "a shared 2-core machine 2 threads ran 10x slower; the numbers "
                             "depend slightly on it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = score(args.real, args.samples, args.image_size, args.epochs, args.seed)
    print(format_report(report))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
