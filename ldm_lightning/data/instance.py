"""The few images of one new subject or class, for few-shot fine-tuning (DreamBooth, Ruiz et
al. 2023: 3-5 images of the subject).

``root`` holds the images directly (3 to 10 of them, any image format). Every split is all of
them, unlabelled: what they show (a new class, an identifier prompt) is the fine-tuned model's
setting (``model.finetune``), not the data's. A training epoch draws each image ``repeats``
times, shuffled, so an epoch of a handful of images is still a useful number of steps between
checkpoints and validations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Dataset, RandomSampler

from ldm_lightning.data.base import SPLITS, ImageDataModule
from ldm_lightning.data.image_folder import IMAGE_EXTENSIONS, list_images
from ldm_lightning.data.image_io import ImageRecord, build_dataset, check_on_corrupt
from ldm_lightning.data.transforms import ResizeCrop
from ldm_lightning.utils.hashing import file_sha256

MIN_IMAGES, MAX_IMAGES = 3, 10


class InstanceDataModule(ImageDataModule):
    """The images of ``root`` (see the module docstring) as every split.

    Args:
        root: the folder of the instance images.
        repeats: how many times a training epoch draws each image.
        flip: random horizontal flips in training (the latent cache keeps both).
        random_crop: random (else centre) square crops in training.
        on_corrupt: ``"skip"`` or ``"error"`` for unreadable images.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 32,
        repeats: int = 100,
        flip: bool = True,
        random_crop: bool = False,
        on_corrupt: str = "error",
        **loader_kwargs: Any,
    ) -> None:
        super().__init__(image_size=image_size, **loader_kwargs)
        if repeats < 1:
            raise ValueError(f"data.repeats must be at least 1, got {repeats}")
        self.root = Path(root)
        self.repeats = repeats
        self.flip = flip
        self.random_crop = random_crop
        self.on_corrupt = check_on_corrupt(on_corrupt)

    def prepare_data(self) -> None:
        """Nothing to download; listing here makes a wrong folder fail before training."""
        self.records()

    def records(self) -> list[ImageRecord]:
        """The instance images, sorted by name; a ValueError unless there are 3 to 10."""
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"data.root={self.root} does not exist: point it at a folder holding the "
                f"{MIN_IMAGES}-{MAX_IMAGES} images of the new subject or class"
            )
        paths = list_images(self.root)
        if not MIN_IMAGES <= len(paths) <= MAX_IMAGES:
            raise ValueError(
                f"data.root={self.root} holds {len(paths)} images ({', '.join(IMAGE_EXTENSIONS)}"
                f"), but few-shot fine-tuning takes {MIN_IMAGES} to {MAX_IMAGES} images of the "
                "new subject or class, directly in the folder: "
                + ("add some." if len(paths) < MIN_IMAGES else
                   "pick the best, or train a class-conditional model on them "
                   "(+experiment=folder_ldm_class).")
            )
        return [ImageRecord(path=path, label=0, caption="") for path in paths]

    def transform_signature(self) -> dict[str, Any]:
        """The settings and the sha256 of every image: the latent cache keys on it, and the
        few images of a concept are what one swaps or re-renders in place between runs, which
        the folder's path alone would not tell from the cached latents of the old ones."""
        files = {record.path.name: file_sha256(record.path) for record in self.records()}
        return {**super().transform_signature(), "files": files}

    def build_split(self, split: str, augment: bool | None = None) -> Dataset:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        augment = split == "train" if augment is None else augment
        transform = ResizeCrop(self.image_size, random_crop=augment and self.random_crop,
                               flip=augment and self.flip)
        return build_dataset(self.records(), transform, self.on_corrupt,
                             where=f"instance folder {self.root}")

    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset("train")
        draws = RandomSampler(dataset, num_samples=self.repeats * len(dataset))
        return self.loader("train", shuffle=False, sampler=draws)
