"""CelebA-HQ (Karras et al. 2018): 30k aligned 1024 px face photos.

There is no official automatic download; two layouts under ``root`` are read:

1. CelebAMask-HQ (Lee et al. 2020), with the 40 CelebA attributes::

       root/CelebAMask-HQ/CelebA-HQ-img/0.jpg ... 29999.jpg
       root/CelebAMask-HQ/CelebAMask-HQ-attribute-anno.txt
           line 1: "30000" (number of images); line 2: the 40 attribute names;
           then "0.jpg  1 -1 1 ..." (file name, 40 values in {1, -1}) per image

   Samples carry ``attributes`` (LongTensor [40] in {0, 1}, file order), ``label`` = the
   ``label_attribute`` as 0/1 (num_classes = 2) and a caption from the attributes
   (``captions.celeba_caption``).
2. A plain folder of face images directly in ``root`` (label 0, num_classes = 0, caption
   ``"a photo of a face"``).

Split: the usual 25k/5k, i.e. the first ``num_train`` images in natural file-name order
(``0.jpg ... 24999.jpg``) are ``train``, the rest ``val``; ``test`` is ``val``. Images are
resized and centre cropped (CelebA-HQ is square already); training flips at random.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ldm_lightning.data.base import SPLITS, ImageDataModule
from ldm_lightning.data.captions import celeba_caption
from ldm_lightning.data.image_folder import is_image_file, list_images
from ldm_lightning.data.image_io import ImageRecord, build_dataset, check_on_corrupt
from ldm_lightning.data.transforms import ResizeCrop

NUM_ATTRIBUTES = 40
FACE_CAPTION = "a photo of a face"
MASK_HQ_DIR = "CelebAMask-HQ"
IMAGE_DIR = "CelebA-HQ-img"
ATTRIBUTE_FILE = "CelebAMask-HQ-attribute-anno.txt"


def read_attributes(path: Path) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """Parse ``CelebAMask-HQ-attribute-anno.txt``.

    Returns the 40 attribute names and, per file name, its attributes mapped ``-1 -> 0``,
    ``1 -> 1``. Raises ``ValueError`` naming the line on any deviation from the format.
    """
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise ValueError(f"{path}: line 1 must be the image count and line 2 the attribute "
                         "names (the CelebAMask-HQ format)")
    count, names = int(lines[0]), lines[1].split()
    if len(names) != NUM_ATTRIBUTES:
        raise ValueError(f"{path}:2: expected {NUM_ATTRIBUTES} attribute names, got {len(names)}")
    rows: dict[str, tuple[int, ...]] = {}
    for number, line in enumerate(lines[2:], start=3):
        fields = line.split()
        values = fields[1:]
        if len(values) != NUM_ATTRIBUTES or any(value not in ("1", "-1") for value in values):
            raise ValueError(f"{path}:{number}: expected '<file> ' and {NUM_ATTRIBUTES} values "
                             f"in {{1, -1}}, got {line!r}")
        rows[fields[0]] = tuple(int(value == "1") for value in values)
    if len(rows) != count:
        raise ValueError(f"{path}: line 1 announces {count} images but {len(rows)} rows follow")
    return names, rows


def natural_key(path: Path) -> tuple[int, int, str]:
    """Sort key putting numeric stems first, in numeric order: ``2.jpg`` before ``10.jpg``."""
    return (0, int(path.stem), path.name) if path.stem.isdigit() else (1, 0, path.name)


class CelebAHQDataModule(ImageDataModule):
    """CelebA-HQ as ``{"image", "label", "caption"[, "attributes"]}`` samples.

    Args:
        root: folder holding ``CelebAMask-HQ/`` or the face images
            (``${paths.data_dir}/celebahq``).
        num_train: the first ``num_train`` images (natural name order) train, the rest validate.
        label_attribute: attribute used as the 0/1 ``label`` (CelebAMask-HQ layout only).
        flip: random horizontal flips on the training split.
        on_corrupt: ``"skip"`` or ``"error"`` for unreadable images (see ``image_io``).
    """

    def __init__(
        self,
        root: str,
        image_size: int = 256,
        num_train: int = 25000,
        label_attribute: str = "Male",
        flip: bool = True,
        on_corrupt: str = "skip",
        **loader_kwargs: Any,
    ) -> None:
        super().__init__(image_size=image_size, **loader_kwargs)
        if num_train <= 0:
            raise ValueError(f"data.num_train must be positive, got {num_train}")
        self.root = Path(root)
        self.num_train = num_train
        self.label_attribute = label_attribute
        self.flip = flip
        self.on_corrupt = check_on_corrupt(on_corrupt)

    @property
    def mask_hq_dir(self) -> Path:
        return self.root / MASK_HQ_DIR

    def _layout_help(self) -> str:
        return (
            "CelebA-HQ has no automatic download. Get CelebAMask-HQ from its official page "
            "(GitHub switchablenorms/CelebAMask-HQ, which links the CelebAMask-HQ.zip archive on "
            f"Google Drive), unzip it into {self.root} so that these exist:\n"
            f"  {self.mask_hq_dir / IMAGE_DIR}/0.jpg ... 29999.jpg\n"
            f"  {self.mask_hq_dir / ATTRIBUTE_FILE}\n"
            f"or put any face images (.jpg, .png) directly in {self.root} (no attributes: label 0, "
            f'caption "{FACE_CAPTION}"). Set data.root (or paths.data_dir) to use another folder.'
        )

    @cached_property
    def layout(self) -> str:
        """``"celebamask-hq"`` or ``"folder"``; raises with the layout help when neither."""
        image_dir, attribute_file = self.mask_hq_dir / IMAGE_DIR, self.mask_hq_dir / ATTRIBUTE_FILE
        if self.mask_hq_dir.is_dir():
            if not attribute_file.is_file():
                raise FileNotFoundError(f"{attribute_file} is missing. " + self._layout_help())
            if not image_dir.is_dir() or not any(map(is_image_file, image_dir.iterdir())):
                raise FileNotFoundError(f"no images in {image_dir}. " + self._layout_help())
            return "celebamask-hq"
        if self.root.is_dir() and any(map(is_image_file, self.root.iterdir())):
            return "folder"
        raise FileNotFoundError(f"CelebA-HQ not found under {self.root}. " + self._layout_help())

    @cached_property
    def attribute_names(self) -> list[str]:
        """The 40 attribute names in file order; empty for a plain folder."""
        if self.layout != "celebamask-hq":
            return []
        return read_attributes(self.mask_hq_dir / ATTRIBUTE_FILE)[0]

    @property
    def num_classes(self) -> int:
        return 2 if self.layout == "celebamask-hq" else 0

    def prepare_data(self) -> None:
        """Nothing to download; finding the layout here fails early with instructions."""
        _ = self.layout

    @cached_property
    def records(self) -> list[ImageRecord]:
        """Every image in natural file-name order (``0.jpg, 1.jpg, ..., 29999.jpg``)."""
        if self.layout == "folder":
            paths = sorted(list_images(self.root), key=natural_key)
            return [ImageRecord(path, 0, FACE_CAPTION) for path in paths]
        names, rows = read_attributes(self.mask_hq_dir / ATTRIBUTE_FILE)
        if self.label_attribute not in names:
            raise ValueError(f"data.label_attribute {self.label_attribute!r} is not a CelebA "
                             f"attribute; valid names: {names}")
        label_index = names.index(self.label_attribute)
        records = []
        for file, values in rows.items():
            caption = celeba_caption({name: bool(v) for name, v in zip(names, values)})
            records.append(ImageRecord(self.mask_hq_dir / IMAGE_DIR / file, values[label_index],
                                       caption, {"attributes": values}))
        return sorted(records, key=lambda record: natural_key(record.path))

    def build_split(self, split: str, augment: bool | None = None) -> Dataset:
        """The ``split`` dataset (``test`` is ``val``); ``augment`` (default: training split
        only) turns on the random flip."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        augment = split == "train" if augment is None else augment
        if self.num_train >= len(self.records):
            raise ValueError(
                f"data.num_train={self.num_train} leaves no validation images: {self.root} has "
                f"{len(self.records)} images. Set data.num_train below {len(self.records)}."
            )
        cut = self.num_train
        chosen = self.records[:cut] if split == "train" else self.records[cut:]
        transform = ResizeCrop(self.image_size, random_crop=False, flip=augment and self.flip)
        return build_dataset(chosen, transform, self.on_corrupt,
                             where=f"CelebA-HQ {split} split")
