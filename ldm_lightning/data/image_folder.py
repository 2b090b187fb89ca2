"""Any folder of images: class sub-folders (labels) or flat images, optional captions.

Layouts under ``root``::

    root/<class name>/**/<image>     sorted class folder names -> labels 0..K-1
    root/<image>                     flat: label 0, unlabelled (num_classes = 0)
    root/captions.jsonl              optional: {"file": "<class>/<image>.jpg", "caption": "..."}
    <segmentation_dir>/<class>/<image stem>.png
                                     optional, outside root: a semantic map per image, one
                                     channel of class indices (semantic synthesis)

An image without a caption line gets ``"a photo of a {class}"`` (``"a photo"`` when flat).
Train/val/test are a seeded split stratified by label (:func:`stratified_split`).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import defaultdict
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ldm_lightning.data.base import SPLITS, ImageDataModule
from ldm_lightning.data.captions import class_caption
from ldm_lightning.data.image_io import ImageRecord, build_dataset, check_on_corrupt
from ldm_lightning.data.transforms import ResizeCrop

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
FLAT_CAPTION = "a photo"


def is_image_file(path: Path) -> bool:
    """An image by its extension (``IMAGE_EXTENSIONS``, any case), not hidden."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (by extension), sorted, skipping hidden files and folders."""
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        path
        for path in candidates
        if path.is_file()
        and is_image_file(path)
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def check_split_fractions(val_fraction: float, test_fraction: float = 0.0) -> None:
    """``0 < val_fraction``, ``0 <= test_fraction`` and ``val + test < 1`` (train keeps some)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    if not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"data.test_fraction must be in [0, 1) with val_fraction + test_fraction < 1, got "
            f"val_fraction={val_fraction}, test_fraction={test_fraction}"
        )


def _largest_remainder(quotas: dict[int, float], total: int) -> dict[int, int]:
    """Integer counts summing to ``total`` (Hamilton's method): floors, then the largest
    fractional parts get one more each (ties in label order)."""
    counts = {label: math.floor(quota) for label, quota in quotas.items()}
    order = sorted(quotas, key=lambda label: (-(quotas[label] - counts[label]), label))
    for label in order[: max(0, total - sum(counts.values()))]:
        counts[label] += 1
    return counts


def stratified_split(
    labels: Sequence[int], fractions: Sequence[float], seed: int
) -> list[list[int]]:
    """Partition ``range(len(labels))`` into ``[rest, part_1, ..., part_k]``, seeded.

    Part ``j`` gets ``round(fractions[j] * N)`` indices in all, shared out over labels in
    proportion to their sizes (largest remainder), so every part keeps the label mix. Within
    a label the indices are shuffled by ``random.Random(seed)`` visiting labels in sorted
    order, so the result depends only on ``labels``, ``fractions`` and ``seed``.
    Each returned list is sorted.
    """
    groups: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        groups[label].append(index)
    rng = random.Random(seed)
    for label in sorted(groups):
        rng.shuffle(groups[label])
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    start = {label: 0 for label in groups}
    for j, fraction in enumerate(fractions, start=1):
        total = math.floor(fraction * len(labels) + 0.5)
        quotas = {label: fraction * len(members) for label, members in groups.items()}
        for label, count in _largest_remainder(quotas, total).items():
            parts[j] += groups[label][start[label] : start[label] + count]
            start[label] += count
    for label, members in groups.items():
        parts[0] += members[start[label] :]
    return [sorted(part) for part in parts]


def _caption_entry(line: str) -> tuple[str, str] | None:
    """``(file, caption)`` of one captions.jsonl line, None when it is malformed."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(entry, dict):
        return None
    file, caption = entry.get("file"), entry.get("caption")
    return (file, caption) if isinstance(file, str) and isinstance(caption, str) else None


class ImageFolderDataModule(ImageDataModule):
    """Datamodule over a folder of images (layouts in the module docstring).

    Args:
        root: the folder.
        val_fraction, test_fraction: seeded stratified split fractions; with
            ``test_fraction=0`` the test split is the validation split.
        seed: seed of the split.
        flip: random horizontal flips on the training split.
        random_crop: random (else centre) square crops on the training split.
        captions_file: name of the optional captions file inside ``root``.
        on_corrupt: ``"skip"`` or ``"error"`` for unreadable images (see ``image_io``).
        segmentation_dir: a folder outside ``root`` with one semantic map per image at the
            image's relative path with a ``.png`` suffix; items then carry ``segmentation``
            (LongTensor [S, S], cropped and flipped with the image). None: no maps.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        seed: int = 0,
        flip: bool = True,
        random_crop: bool = True,
        captions_file: str = "captions.jsonl",
        on_corrupt: str = "skip",
        segmentation_dir: str | None = None,
        **loader_kwargs: Any,
    ) -> None:
        super().__init__(image_size=image_size, **loader_kwargs)
        check_split_fractions(val_fraction, test_fraction)
        self.root = Path(root)
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.flip = flip
        self.random_crop = random_crop
        self.captions_file = captions_file
        self.on_corrupt = check_on_corrupt(on_corrupt)
        self.segmentation_dir = None if segmentation_dir is None else Path(segmentation_dir)
        if self.segmentation_dir is not None and self.segmentation_dir.resolve().is_relative_to(
            self.root.resolve()
        ):
            raise ValueError(
                f"data.segmentation_dir={self.segmentation_dir} is inside data.root={self.root}, "
                "where its maps would be read as images; move the maps out of the image folder"
            )

    def _layout_help(self) -> str:
        return (
            f"Expected class folders {self.root}/<class name>/<image>.jpg (sorted folder names "
            f"-> labels 0..K-1) or images directly in {self.root} (label 0), with image "
            f"extensions {', '.join(IMAGE_EXTENSIONS)}, and optionally "
            f'{self.root / self.captions_file} with lines {{"file": "<class name>/<image>.jpg", '
            '"caption": "..."}.'
        )

    @cached_property
    def class_names(self) -> list[str]:
        """Class folder names in label order; empty for a flat folder."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist. "
                                    + self._layout_help())
        folders = sorted(
            path for path in self.root.iterdir()
            if path.is_dir() and not path.name.startswith(".")
        )
        flat = list_images(self.root)
        if folders and flat:
            raise ValueError(
                f"{self.root} holds both class folders ({folders[0].name}, ...) and images "
                f"({flat[0].name}, ...); move the images into class folders or the folders "
                "out. " + self._layout_help()
            )
        if not folders and not flat:
            raise FileNotFoundError(f"no images found in {self.root}. " + self._layout_help())
        for folder in folders:
            if not list_images(folder, recursive=True):
                raise ValueError(f"class folder {folder} has no images; add images or remove it. "
                                 + self._layout_help())
        return [folder.name for folder in folders]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def prepare_data(self) -> None:
        """Nothing to download; indexing here makes a wrong root fail before training starts."""
        _ = self.records

    def _read_captions(self, known: set[str]) -> dict[str, str]:
        path = self.root / self.captions_file
        if not path.is_file():
            return {}
        captions: dict[str, str] = {}
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            entry = _caption_entry(line)
            if entry is None:
                raise ValueError(
                    f'{path}:{number}: expected {{"file": "<path>", "caption": "<text>"}} with '
                    f"string values, got {line!r}"
                )
            file, caption = entry
            file = Path(file).as_posix()
            if file not in known:
                raise ValueError(f"{path}:{number}: {file!r} is not an image under {self.root}")
            if file in captions:
                raise ValueError(f"{path}:{number}: a second caption for {file!r}")
            captions[file] = caption
        return captions

    @cached_property
    def records(self) -> list[ImageRecord]:
        """Every image of the folder with its label and caption, sorted by path."""
        names = self.class_names
        if names:
            files = [(path, label) for label, name in enumerate(names)
                     for path in list_images(self.root / name, recursive=True)]
        else:
            files = [(path, 0) for path in list_images(self.root)]
        relative = [path.relative_to(self.root).as_posix() for path, _ in files]
        captions = self._read_captions(set(relative))
        maps = self._map_paths(relative)
        return [
            ImageRecord(
                path=path,
                label=label,
                caption=captions.get(rel, class_caption(names[label]) if names else FLAT_CAPTION),
                segmentation=segmentation,
            )
            for (path, label), rel, segmentation in zip(files, relative, maps)
        ]

    def _map_paths(self, relative: list[str]) -> list[Path | None]:
        """Each image's semantic map, ``segmentation_dir/<relative path>.png``; every one must
        exist (checked here, before any training)."""
        if self.segmentation_dir is None:
            return [None] * len(relative)
        maps = [(self.segmentation_dir / rel).with_suffix(".png") for rel in relative]
        missing = [str(path) for path in maps if not path.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(maps)} images have no semantic map in "
                f"{self.segmentation_dir} (e.g. {', '.join(missing[:3])}); each image "
                f"{self.root}/<path>.<ext> needs a map {self.segmentation_dir}/<path>.png"
            )
        return maps

    def transform_signature(self) -> dict[str, Any]:
        """The settings and a digest of the folder's listing: every image's relative path,
        size, modification time, label and caption (and its map's size and time). A user
        adds, removes or replaces images (or maps, or edits ``captions.jsonl``) in the same
        folder between runs; the path alone would reuse the latents and captions of the old
        ones. Size and time, not the contents' sha256, so a large folder is not read whole at
        every start (as ``make`` does)."""
        listing = hashlib.sha256()
        for record in self.records:
            stat = record.path.stat()
            entry = [record.path.relative_to(self.root).as_posix(), stat.st_size,
                     stat.st_mtime_ns, record.label, record.caption]
            if record.segmentation is not None:
                map_stat = record.segmentation.stat()
                entry += [map_stat.st_size, map_stat.st_mtime_ns]
            listing.update(json.dumps(entry).encode() + b"\n")
        return {**super().transform_signature(), "listing": listing.hexdigest()}

    def build_split(self, split: str, augment: bool | None = None) -> Dataset:
        """The ``split`` dataset; ``augment`` (default: training split only) turns on the
        random crop and flip."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        augment = split == "train" if augment is None else augment
        records = self.records
        train, val, test = stratified_split(
            [record.label for record in records], (self.val_fraction, self.test_fraction),
            self.seed,
        )
        if self.test_fraction == 0:
            test = val
        chosen = {"train": train, "val": val, "test": test}[split]
        transform = ResizeCrop(self.image_size, random_crop=augment and self.random_crop,
                               flip=augment and self.flip)
        return build_dataset([records[i] for i in chosen], transform, self.on_corrupt,
                             where=f"{split} split of image folder {self.root}")
