"""Synthetic ``shapes``: the offline default dataset.

Each image is one filled shape (circle, square or triangle) in one of six colours on a
background of another colour, at a random position and size. Everything about an image is
known exactly, so it carries an integer label (shape x colour), an exact caption
("a red circle on a gray background") and an exact segmentation (0: background, 1: shape, where
the shape covers at least half of a pixel), and a checker can read them back from pixels.

Images are drawn on demand from a per-item seed ``(seed, split, index)``: any resolution,
identical on every machine and worker, nothing stored on disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ldm_lightning.data.base import ImageDataModule
from ldm_lightning.data.interface import CaptionedDataset

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SHAPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "magenta": (200, 50, 200),
    "cyan": (40, 200, 210),
}
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    **SHAPE_COLOURS,
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
# Shape colours the renderer draws but the dataset never samples: concepts a shapes model has not
# seen, to teach it by few-shot fine-tuning (conf/experiment/shapes_finetune.yaml) and to read
# back with the checker (its ``colours`` argument).
NEW_COLOURS: dict[str, tuple[int, int, int]] = {
    "orange": (245, 130, 20),
    "white": BACKGROUND_COLOURS["white"],  # seen as backgrounds only
    "black": BACKGROUND_COLOURS["black"],
}
RENDER_COLOURS: dict[str, tuple[int, int, int]] = {**SHAPE_COLOURS, **NEW_COLOURS}
COLOUR_NAMES: tuple[str, ...] = tuple(SHAPE_COLOURS)
NUM_CLASSES = len(SHAPES) * len(COLOUR_NAMES)
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class ShapeSpec:
    """Everything that defines one drawn image; sizes are fractions of the image side."""

    shape: str
    colour: str
    background: str
    centre_x: float
    centre_y: float
    radius: float

    @property
    def label(self) -> int:
        return label_of(self.shape, self.colour)

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def label_of(shape: str, colour: str) -> int:
    """Class index ``shape_index * 6 + colour_index`` (18 classes)."""
    return SHAPES.index(shape) * len(COLOUR_NAMES) + COLOUR_NAMES.index(colour)


def describe_label(label: int) -> tuple[str, str]:
    """Inverse of :func:`label_of`: ``(shape, colour)``."""
    if not 0 <= label < NUM_CLASSES:
        raise ValueError(f"shapes label {label} out of range [0, {NUM_CLASSES - 1}]")
    return SHAPES[label // len(COLOUR_NAMES)], COLOUR_NAMES[label % len(COLOUR_NAMES)]


def random_spec(
    rng: np.random.Generator, min_radius: float = 0.2, max_radius: float = 0.38
) -> ShapeSpec:
    """Draw a shape, colour, background (never the shape's colour), size and position."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
    backgrounds = [name for name in BACKGROUND_COLOURS if name != colour]
    background = backgrounds[rng.integers(len(backgrounds))]
    radius = float(rng.uniform(min_radius, max_radius))
    centre_x, centre_y = (float(v) for v in rng.uniform(radius, 1.0 - radius, size=2))
    return ShapeSpec(shape, colour, background, centre_x, centre_y, radius)


def shape_mask(spec: ShapeSpec, size: int, antialias: int = 4) -> np.ndarray:
    """Coverage in [0, 1] of the shape over a ``size x size`` pixel grid, ``[size, size]``.

    Rendered at ``antialias`` times the resolution and box-filtered down, so edges are smooth
    at any size.
    """
    fine = size * antialias
    coords = (np.arange(fine) + 0.5) / fine
    x, y = np.meshgrid(coords, coords, indexing="xy")
    dx, dy, r = x - spec.centre_x, y - spec.centre_y, spec.radius
    if spec.shape == "circle":
        inside = dx**2 + dy**2 <= r**2
    elif spec.shape == "square":
        half = r / np.sqrt(2.0)  # same circumscribed radius as the other shapes
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif spec.shape == "triangle":
        # Upward equilateral triangle inscribed in the circle of radius r.
        bottom = dy <= r / 2
        half_width = (dy + r) / np.sqrt(3.0)
        inside = bottom & (dy >= -r) & (np.abs(dx) <= half_width)
    else:
        raise ValueError(f"unknown shape {spec.shape!r}; valid: {SHAPES}")
    coverage = inside.astype(np.float32).reshape(size, antialias, size, antialias)
    return coverage.mean(axis=(1, 3))


def render(spec: ShapeSpec, size: int, antialias: int = 4) -> torch.Tensor:
    """The image of ``spec`` as a float tensor ``[3, size, size]`` in [-1, 1]; its colour is
    one of ``RENDER_COLOURS`` (the dataset's six and ``NEW_COLOURS``)."""
    return paint(spec, shape_mask(spec, size, antialias))


def paint(spec: ShapeSpec, coverage: np.ndarray) -> torch.Tensor:
    """The shape's colour over its background by ``coverage`` ``[H, W]``: ``[3, H, W]`` in
    [-1, 1]."""
    if spec.colour not in RENDER_COLOURS:
        raise ValueError(f"unknown shape colour {spec.colour!r}; valid: {tuple(RENDER_COLOURS)}")
    mask = coverage[None]
    fg = np.asarray(RENDER_COLOURS[spec.colour], dtype=np.float32)[:, None, None] / 255.0
    bg = np.asarray(BACKGROUND_COLOURS[spec.background], dtype=np.float32)[:, None, None] / 255.0
    image = mask * fg + (1.0 - mask) * bg
    return torch.from_numpy(image * 2.0 - 1.0)


def class_name(label: int) -> str:
    """``"<colour> <shape>"`` of a label of the 18 (``"red circle"``)."""
    shape, colour = describe_label(label)
    return f"{colour} {shape}"


def kept_labels(exclude: Sequence[str] = ()) -> list[int]:
    """The labels of the 18 not named in ``exclude`` (class names, ``"cyan circle"``), in order.

    Raises ValueError for an unknown name or when nothing is left."""
    names = [class_name(label) for label in range(NUM_CLASSES)]
    unknown = [name for name in exclude if name not in names]
    if unknown:
        raise ValueError(f"unknown shapes classes {unknown} in exclude; valid: {names}")
    kept = [label for label, name in enumerate(names) if name not in exclude]
    if not kept:
        raise ValueError("exclude names all 18 shapes classes; leave at least one")
    return kept


class ShapesDataset(CaptionedDataset):
    """``length`` procedurally drawn images of one split; item ``i`` is the same on every call.

    ``exclude`` names classes never drawn (a draw of one is redrawn from the item's generator);
    labels then index the remaining classes in order (:func:`kept_labels`), so a model trained
    on them has never seen the excluded ones, e.g. to teach one by few-shot fine-tuning."""

    def __init__(
        self,
        length: int,
        image_size: int,
        split: str = "train",
        seed: int = 0,
        antialias: int = 4,
        exclude: Sequence[str] = (),
    ) -> None:
        if split not in _SPLIT_IDS:
            raise ValueError(f"unknown split {split!r}; valid: {tuple(_SPLIT_IDS)}")
        self.length = length
        self.image_size = image_size
        self.split = split
        self.seed = seed
        self.antialias = antialias
        self.label_index = {label: i for i, label in enumerate(kept_labels(exclude))}

    def __len__(self) -> int:
        return self.length

    def spec(self, index: int) -> ShapeSpec:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} images")
        rng = np.random.default_rng((self.seed, _SPLIT_IDS[self.split], index))
        spec = random_spec(rng)
        while spec.label not in self.label_index:
            spec = random_spec(rng)
        return spec

    def captions(self) -> list[str]:
        return [self.spec(i).caption for i in range(self.length)]

    def __getitem__(self, index: int) -> dict:
        spec = self.spec(index)
        coverage = shape_mask(spec, self.image_size, self.antialias)
        return {
            "image": paint(spec, coverage),
            "segmentation": torch.from_numpy(coverage >= 0.5).long(),
            "label": self.label_index[spec.label],
            "caption": spec.caption,
        }


class ShapesDataModule(ImageDataModule):
    """Train/val/test splits of :class:`ShapesDataset`, disjoint by their seeds."""

    def __init__(
        self,
        image_size: int = 32,
        num_train: int = 2000,
        num_val: int = 200,
        num_test: int = 200,
        seed: int = 0,
        antialias: int = 4,
        exclude: Sequence[str] = (),
        **loader_kwargs,
    ) -> None:
        super().__init__(image_size=image_size, **loader_kwargs)
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.seed = seed
        self.antialias = antialias
        self.exclude = sorted(exclude)
        self._labels = kept_labels(self.exclude)  # checked before any work

    @property
    def num_classes(self) -> int:
        return len(self._labels)

    @property
    def class_names(self) -> list[str]:
        """``"<colour> <shape>"`` of each label (the 18 less ``exclude``)."""
        return [class_name(label) for label in self._labels]

    def build_split(self, split: str, augment: bool | None = None) -> ShapesDataset:
        # Shapes are drawn at random already; there is no augmentation to switch.
        return ShapesDataset(
            self.sizes[split], self.image_size, split, self.seed, self.antialias, self.exclude
        )
