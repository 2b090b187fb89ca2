"""Oxford-IIIT Pet (Parkhi et al. 2012): 37 cat and dog breeds, about 7.4k photos.

Read from torchvision's ``OxfordIIITPet`` layout under ``root``::

    root/oxford-iiit-pet/images/<image id>.jpg
    root/oxford-iiit-pet/annotations/list.txt        "# ..." header, then
    root/oxford-iiit-pet/annotations/trainval.txt    "<image id> <class id 1..37> <species 1 cat,
    root/oxford-iiit-pet/annotations/test.txt          2 dog> <breed id>" per line

``prepare_data`` downloads it with torchvision's own code when it is missing. Splits: the
official ``test.txt``; ``val`` is a seeded ``val_fraction`` of ``trainval.txt`` stratified by
breed, ``train`` the rest. Labels are the breeds (class id - 1), species 0 cat / 1 dog,
captions ``"a photo of a great pyrenees, a type of dog"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from torchvision.datasets import OxfordIIITPet

from ldm_lightning.data.base import SPLITS, ImageDataModule
from ldm_lightning.data.captions import SPECIES, pet_caption, readable_name
from ldm_lightning.data.image_folder import check_split_fractions, stratified_split
from ldm_lightning.data.image_io import ImageRecord, build_dataset, check_on_corrupt
from ldm_lightning.data.transforms import ResizeCrop

NUM_BREEDS = 37
PETS_PAGE = "https://www.robots.ox.ac.uk/~vgg/data/pets/"
ANNOTATION_FILES = ("list.txt", "trainval.txt", "test.txt")


@dataclass(frozen=True)
class PetRow:
    """One annotation line: ``Abyssinian_100 1 1 1``."""

    image_id: str
    class_id: int
    species: int

    @property
    def breed(self) -> str:
        """Breed as in the file name (``"great_pyrenees"``, ``"Abyssinian"``)."""
        return self.image_id.rsplit("_", 1)[0]


def read_annotation(path: Path) -> list[PetRow]:
    """Rows of ``list.txt`` / ``trainval.txt`` / ``test.txt`` (``#`` lines are comments)."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split()
        try:
            image_id, class_id, species = fields[0], int(fields[1]), int(fields[2])
        except (IndexError, ValueError) as err:
            raise ValueError(f"{path}:{number}: expected '<image id> <class id> <species> "
                             f"<breed id>', got {line!r}") from err
        if not (1 <= class_id <= NUM_BREEDS and species in (1, 2)):
            raise ValueError(f"{path}:{number}: class id must be in 1..{NUM_BREEDS} and species "
                             f"1 (cat) or 2 (dog), got {line!r}")
        rows.append(PetRow(image_id, class_id, species))
    return rows


class PetsDataModule(ImageDataModule):
    """Oxford-IIIT Pet as ``{"image", "label", "caption", "species"}`` samples.

    Args:
        root: folder holding ``oxford-iiit-pet/`` (``${paths.data_dir}``).
        download: let ``prepare_data`` fetch the dataset with torchvision when it is missing.
        classes: breed names to keep (``["beagle", "Great Pyrenees"]``); labels are then
            their positions in this list. None keeps all 37 with label = class id - 1.
        val_fraction: part of ``trainval`` held out as validation, stratified by breed.
        seed: seed of the validation split.
        flip: random horizontal flips on the training split (which also crops at random).
        on_corrupt: ``"skip"`` or ``"error"`` for unreadable images (see ``image_io``).
    """

    def __init__(
        self,
        root: str,
        image_size: int = 256,
        download: bool = True,
        classes: Sequence[str] | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        flip: bool = True,
        on_corrupt: str = "skip",
        **loader_kwargs: Any,
    ) -> None:
        super().__init__(image_size=image_size, **loader_kwargs)
        check_split_fractions(val_fraction)
        self.root = Path(root)
        self.base = self.root / "oxford-iiit-pet"
        self.download = download
        self.classes = None if classes is None else [readable_name(name) for name in classes]
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError(f"data.classes lists a breed twice: {list(classes)}")
        self.val_fraction = val_fraction
        self.seed = seed
        self.flip = flip
        self.on_corrupt = check_on_corrupt(on_corrupt)

    @property
    def num_classes(self) -> int:
        return NUM_BREEDS if self.classes is None else len(self.classes)

    def _layout_help(self) -> str:
        return (
            f"Expected {self.base}/images/<image id>.jpg and {self.base}/annotations/"
            f"{{{','.join(ANNOTATION_FILES)}}}. Set data.download=true to let torchvision "
            f"download it (images.tar.gz and annotations.tar.gz, about 800 MB, from {PETS_PAGE}), "
            f"or download those two archives from that page and extract both into {self.base}."
        )

    def _exists(self) -> bool:
        annotations = self.base / "annotations"
        return (self.base / "images").is_dir() and all(
            (annotations / name).is_file() for name in ANNOTATION_FILES
        )

    def prepare_data(self) -> None:
        """Download with ``torchvision.datasets.OxfordIIITPet`` if missing (once per node)."""
        if self._exists():
            return
        if not self.download:
            raise FileNotFoundError(f"Oxford-IIIT Pet not found under {self.root}. "
                                    + self._layout_help())
        try:
            OxfordIIITPet(str(self.root), download=True)
        except (OSError, RuntimeError) as err:
            raise RuntimeError(f"downloading Oxford-IIIT Pet into {self.root} failed ({err}). "
                               + self._layout_help()) from err
        if not self._exists():
            raise FileNotFoundError(f"Oxford-IIIT Pet is incomplete under {self.root} after the "
                                    "download. " + self._layout_help())

    def _read(self, name: str) -> list[PetRow]:
        if not self._exists():
            raise FileNotFoundError(f"Oxford-IIIT Pet not found under {self.root}. "
                                    + self._layout_help())
        return read_annotation(self.base / "annotations" / name)

    @cached_property
    def breeds(self) -> dict[int, str]:
        """Breed name (as in the file names) of each class id, from ``list.txt``."""
        breeds: dict[int, str] = {}
        for row in self._read("list.txt"):
            if breeds.setdefault(row.class_id, row.breed) != row.breed:
                raise ValueError(f"annotations/list.txt gives class id {row.class_id} to both "
                                 f"{breeds[row.class_id]!r} and {row.breed!r}")
        return breeds

    @cached_property
    def class_names(self) -> list[str]:
        """Readable breed names in label order (``"great pyrenees"``)."""
        available = {readable_name(breed): class_id for class_id, breed in self.breeds.items()}
        if self.classes is None:
            missing = sorted(set(range(1, NUM_BREEDS + 1)) - set(self.breeds))
            if missing:
                raise ValueError(
                    f"{self.base}/annotations/list.txt lacks class ids {missing}: the copy is "
                    "incomplete. Delete it and download again, or keep the breeds present with "
                    f"data.classes (valid: {sorted(available)})."
                )
            return [readable_name(self.breeds[class_id]) for class_id in range(1, NUM_BREEDS + 1)]
        unknown = [name for name in self.classes if name not in available]
        if unknown:
            raise ValueError(f"unknown Oxford-IIIT Pet breed(s) {unknown} in data.classes; valid "
                             f"names: {sorted(available)}")
        return list(self.classes)

    def _label(self, row: PetRow) -> int | None:
        """Label of a row, None when its breed is not selected."""
        if self.classes is None:
            return row.class_id - 1
        name = readable_name(row.breed)
        return self.class_names.index(name) if name in self.class_names else None

    def split_rows(self, split: str) -> list[PetRow]:
        """Annotation rows of ``split`` before class selection and file checks."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split == "test":
            return self._read("test.txt")
        trainval = self._read("trainval.txt")
        train, val = stratified_split([row.class_id for row in trainval], (self.val_fraction,),
                                      self.seed)
        return [trainval[i] for i in (train if split == "train" else val)]

    def build_split(self, split: str, augment: bool | None = None) -> Dataset:
        """The ``split`` dataset; ``augment`` (default: training split only) turns on the
        random crop and flip."""
        augment = split == "train" if augment is None else augment
        records = []
        for row in self.split_rows(split):
            label = self._label(row)
            if label is None:
                continue
            species = SPECIES[row.species - 1]
            records.append(ImageRecord(
                path=self.base / "images" / f"{row.image_id}.jpg",
                label=label,
                caption=pet_caption(row.breed, species),
                extras={"species": row.species - 1},
            ))
        transform = ResizeCrop(self.image_size, random_crop=augment, flip=augment and self.flip)
        return build_dataset(records, transform, self.on_corrupt,
                             where=f"Oxford-IIIT Pet {split} split")
