"""Safe image reading: RGB decoding, cheap validity checks, and a dataset over image files.

Corrupt files, and when they are found
---------------------------------------
A full decode of every image at setup costs about as much as one training epoch of data
loading (CelebA-HQ: 30k 1024 px JPEGs), so setup runs a cheap check per file
(:func:`image_problem`): the file must exist, PIL must identify it and ``verify()`` it (this
reads the whole of a PNG and checks its chunk CRCs, so truncated PNGs are caught), and a JPEG
must end with its end-of-image marker ``FF D9``. ``verify()`` alone does not read JPEG scan
data, and PIL refuses to decode a JPEG that lost its tail, so the marker test is what catches
truncated JPEGs; the rare JPEG whose tail fails that test is fully decoded before it is
declared broken, so trailing bytes after the marker never drop a good image.

What the cheap check cannot see (damaged scan data in the middle of a file) fails at decode
time in :class:`ImageRecordDataset`: with ``on_corrupt="skip"`` the item falls back to the
next readable index, counts the failure and warns with the file name; with ``"error"`` it
raises naming the file. Counts are per process (each DataLoader worker keeps its own).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ldm_lightning.data.interface import CaptionedDataset
from ldm_lightning.data.transforms import ResizeCrop

ON_CORRUPT = ("skip", "error")
# What PIL raises on files it cannot identify or decode.
DECODE_ERRORS = (
    OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError
)
_JPEG_END = b"\xff\xd9"
_NAMED_IN_MESSAGES = 10


def check_on_corrupt(on_corrupt: str) -> str:
    """Validate the ``on_corrupt`` option (``"skip"`` or ``"error"``)."""
    if on_corrupt not in ON_CORRUPT:
        raise ValueError(f"data.on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
    return on_corrupt


def _white_background(image: Image.Image) -> Image.Image:
    """Composite an image with alpha over white: transparent pixels become white, not black."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB.

    Alpha (RGBA, LA, PA, palette with a transparent index) is composited over white;
    16-bit grayscale (``I;16*``, and ``I`` read as 16-bit) is scaled by ``1/257`` to 8 bits
    (PIL's own ``convert`` would clip it); every other mode uses PIL's conversion.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        return _white_background(image)
    if image.mode.startswith("I"):
        wide = np.asarray(image).astype(np.float64)
        gray = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str | os.PathLike, draft_size: int | None = None) -> Image.Image:
    """Decode an image file to RGB, applying its EXIF orientation.

    With ``draft_size``, a JPEG is decoded by libjpeg at the largest 1/2, 1/4 or 1/8 scale
    whose width and height both stay >= ``draft_size`` (PIL ``Image.draft``): a 1024 px
    CelebA-HQ image wanted at 256 px is decoded at 256 px, 16x fewer pixels, and resampled
    once afterwards (:class:`ResizeCrop`). Raises PIL's errors (``DECODE_ERRORS``) on bad files.
    """
    with Image.open(path) as image:
        if draft_size is not None:
            image.draft("RGB", (draft_size, draft_size))
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        return to_rgb(image)


MAP_MODES = ("L", "P", "I", "I;16")  # one channel of class indices


def load_map(path: str | os.PathLike) -> Image.Image:
    """A semantic map: a one-channel image (8-bit grey or palette PNG, or 16/32-bit integer)
    whose pixel values are class indices. Raises ValueError for any other mode."""
    with Image.open(path) as image:
        image.load()
        if image.mode not in MAP_MODES:
            raise ValueError(
                f"semantic map {path} has mode {image.mode}; save maps as one-channel images of "
                f"class indices (modes {', '.join(MAP_MODES)}: a grey or palette PNG)"
            )
        return image.copy()


def _jpeg_is_complete(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - 1024))
        tail = handle.read().rstrip(b"\x00")
    return tail.endswith(_JPEG_END)


def image_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a readable image (``"missing file"``, PIL's error), else None.

    Cheap: a header check plus, for JPEG, the end-of-image marker (see the module notes).
    """
    path = Path(path)
    if not path.is_file():
        return "missing file"
    try:
        with Image.open(path) as image:
            image_format = image.format
            image.verify()
        if image_format == "JPEG" and not _jpeg_is_complete(path):
            with Image.open(path) as image:
                image.load()
    except DECODE_ERRORS as err:
        return f"{type(err).__name__}: {err}"
    return None


@dataclass(frozen=True)
class ImageRecord:
    """One image file and its annotations.

    ``extras`` are extra sample keys: ints stay ints, tuples of ints become LongTensors
    (``attributes`` [40] for CelebA-HQ). ``segmentation``: the file of its semantic map, read
    into the sample's ``segmentation`` through the image's own crop and flip.
    """

    path: Path
    label: int
    caption: str
    extras: Mapping[str, int | tuple[int, ...]] = field(default_factory=dict)
    segmentation: Path | None = None  # its semantic map (:func:`load_map`), if any


def _name_files(problems: Sequence[tuple[ImageRecord, str]]) -> str:
    shown = problems[:_NAMED_IN_MESSAGES]
    named = "; ".join(f"{record.path} ({reason})" for record, reason in shown)
    more = len(problems) - _NAMED_IN_MESSAGES
    return named + (f"; and {more} more" if more > 0 else "")


def drop_unreadable(records: Sequence[ImageRecord], on_corrupt: str) -> list[ImageRecord]:
    """Check every record's file with :func:`image_problem`.

    ``on_corrupt="skip"``: drop the bad ones with one warning that counts and names them.
    ``on_corrupt="error"``: raise ``ValueError`` naming them.
    """
    check_on_corrupt(on_corrupt)
    problems = [(record, reason) for record in records if (reason := image_problem(record.path))]
    if not problems:
        return list(records)
    if on_corrupt == "error":
        raise ValueError(
            f"{len(problems)} unreadable image(s): {_name_files(problems)}. Replace or delete "
            "them, or set data.on_corrupt=skip to leave them out."
        )
    warnings.warn(
        f"skipping {len(problems)} unreadable image(s) of {len(records)}: {_name_files(problems)}",
        stacklevel=2,
    )
    bad = {id(record) for record, _ in problems}
    return [record for record in records if id(record) not in bad]


class ImageRecordDataset(CaptionedDataset):
    """Images of a list of records as ``{"image", "label", "caption", **extras}`` dicts (and
    ``segmentation`` where the records have maps).

    ``image``: FloatTensor [3, S, S] in [-1, 1] from ``transform`` (S = ``transform.size``).
    A file that fails to decode is skipped (next index, warning naming it, counted in
    ``decode_failures``) or raises ``ValueError`` naming it, per ``on_corrupt``.
    """

    def __init__(
        self, records: Sequence[ImageRecord], transform: ResizeCrop, on_corrupt: str = "skip"
    ) -> None:
        if not records:
            raise ValueError("an image dataset needs at least one image, got no records")
        self.records = list(records)
        self.transform = transform
        self.on_corrupt = check_on_corrupt(on_corrupt)
        self.decode_failures = 0

    def __len__(self) -> int:
        return len(self.records)

    def captions(self) -> list[str]:
        return [record.caption for record in self.records]

    def _decode(self, record: ImageRecord) -> Image.Image | None:
        # A map is drawn at the image's full size: no reduced-scale JPEG decoding then.
        draft_size = None if record.segmentation else self.transform.size
        try:
            return load_rgb(record.path, draft_size=draft_size)
        except DECODE_ERRORS as err:
            if self.on_corrupt == "error":
                raise ValueError(
                    f"cannot decode image {record.path} ({type(err).__name__}: {err}); replace "
                    "or delete it, or set data.on_corrupt=skip"
                ) from err
            self.decode_failures += 1
            warnings.warn(
                f"skipping unreadable image {record.path} ({type(err).__name__}: {err}); using "
                f"the next one ({self.decode_failures} decode failure(s) in this process)",
                stacklevel=3,
            )
            return None

    def __getitem__(self, index: int) -> dict[str, Any]:
        for offset in range(len(self.records)):
            record = self.records[(index + offset) % len(self.records)]
            image = self._decode(record)
            if image is not None:
                sample: dict[str, Any] = {"label": record.label, "caption": record.caption}
                if record.segmentation is None:
                    sample["image"] = self.transform(image)
                else:
                    sample["image"], sample["segmentation"] = self.transform.with_map(
                        image, load_map(record.segmentation))
                for key, value in record.extras.items():
                    is_vector = isinstance(value, tuple)
                    sample[key] = torch.tensor(value, dtype=torch.long) if is_vector else value
                return sample
        raise ValueError(f"none of the {len(self.records)} images of this dataset can be decoded")


def build_dataset(
    records: Sequence[ImageRecord], transform: ResizeCrop, on_corrupt: str, where: str
) -> ImageRecordDataset:
    """Check the files (:func:`drop_unreadable`) and wrap the readable ones in a dataset.

    ``where`` names the split in errors (``"Oxford-IIIT Pet val split"``).
    """
    readable = drop_unreadable(records, on_corrupt)
    if not readable:
        raise ValueError(
            f"the {where} has no readable images ({len(records)} listed); check the data "
            "folder, or change the split fractions so that this split gets images"
        )
    return ImageRecordDataset(readable, transform, on_corrupt)
