"""Small fake on-disk copies of the real dataset layouts, written with PIL.

``make_fake_pets`` writes torchvision's Oxford-IIIT Pet layout (images, ``list.txt`` with its
header, ``trainval.txt``, ``test.txt``, ``trimaps``); ``make_fake_celebahq`` the CelebAMask-HQ
layout (numbered images, attribute file in its real format) or a plain folder of faces;
``make_fake_image_folder`` class folders or flat images. Each image is one flat colour that
encodes which image it is (see ``pet_colour`` and ``face_colour``), so a test can check that a
sample holds the right file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# The real Oxford-IIIT Pet table: (breed as in file names, class id, species 1 cat / 2 dog,
# breed id within the species).
PET_BREEDS: tuple[tuple[str, int, int, int], ...] = (
    ("Abyssinian", 1, 1, 1), ("american_bulldog", 2, 2, 1),
    ("american_pit_bull_terrier", 3, 2, 2), ("basset_hound", 4, 2, 3), ("beagle", 5, 2, 4),
    ("Bengal", 6, 1, 2), ("Birman", 7, 1, 3), ("Bombay", 8, 1, 4), ("boxer", 9, 2, 5),
    ("British_Shorthair", 10, 1, 5), ("chihuahua", 11, 2, 6), ("Egyptian_Mau", 12, 1, 6),
    ("english_cocker_spaniel", 13, 2, 7), ("english_setter", 14, 2, 8),
    ("german_shorthaired", 15, 2, 9), ("great_pyrenees", 16, 2, 10), ("havanese", 17, 2, 11),
    ("japanese_chin", 18, 2, 12), ("keeshond", 19, 2, 13), ("leonberger", 20, 2, 14),
    ("Maine_Coon", 21, 1, 7), ("miniature_pinscher", 22, 2, 15), ("newfoundland", 23, 2, 16),
    ("Persian", 24, 1, 8), ("pomeranian", 25, 2, 17), ("pug", 26, 2, 18), ("Ragdoll", 27, 1, 9),
    ("Russian_Blue", 28, 1, 10), ("saint_bernard", 29, 2, 19), ("samoyed", 30, 2, 20),
    ("scottish_terrier", 31, 2, 21), ("shiba_inu", 32, 2, 22), ("Siamese", 33, 1, 11),
    ("Sphynx", 34, 1, 12), ("staffordshire_bull_terrier", 35, 2, 23),
    ("wheaten_terrier", 36, 2, 24), ("yorkshire_terrier", 37, 2, 25),
)

LIST_HEADER = (
    "#Image CLASS-ID SPECIES BREED ID\n"
    "#ID: 1:37 Class ids\n"
    "#SPECIES: 1:Cat 2:Dog\n"
    "#BREED ID: 1-25:Cat 1:12:Dog\n"
    "#All images with 1st letter as captial are cat images\n"
    "#images with small first letter are dog images\n"
)

CELEBA_ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair",
    "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair",
    "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache",
    "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings",
    "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)


def pet_colour(class_id: int, number: int) -> tuple[int, int, int]:
    """Flat colour of fake pet image ``<breed>_<number>``."""
    return (6 * class_id, 30 * number % 256, 128)


def face_colour(index: int) -> tuple[int, int, int]:
    """Flat colour of fake face ``<index>.jpg``."""
    return (40 + 10 * index % 200, 90, 200)


def photo_like(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A smooth random RGB field plus grain: compresses and decodes like a real photo."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize(size, Image.Resampling.BICUBIC), dtype=np.float32)
    grain = rng.normal(0.0, 8.0, smooth.shape)
    return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))


def make_fake_pets(
    root: str | Path,
    breeds: tuple[str, ...] | None = None,
    n_trainval: int = 4,
    n_test: int = 2,
    size: tuple[int, int] = (40, 30),
    photo: bool = False,
) -> Path:
    """Write ``root/oxford-iiit-pet`` as torchvision lays it out; returns that folder.

    Each breed (all 37 by default) gets ``n_trainval`` images ``<breed>_1..`` listed in
    ``trainval.txt`` and ``n_test`` more in ``test.txt``; images are ``size`` (w, h) JPEGs of
    flat ``pet_colour`` or, with ``photo``, :func:`photo_like` content.
    """
    base = Path(root) / "oxford-iiit-pet"
    images, annotations = base / "images", base / "annotations"
    (annotations / "trimaps").mkdir(parents=True, exist_ok=True)
    images.mkdir(parents=True, exist_ok=True)
    table = [row for row in PET_BREEDS if breeds is None or row[0] in breeds]
    rng = np.random.default_rng(0)
    lines: dict[str, list[str]] = {"trainval": [], "test": []}
    for breed, class_id, species, breed_id in table:
        for number in range(1, n_trainval + n_test + 1):
            image_id = f"{breed}_{number}"
            image = photo_like(rng, size) if photo else Image.new("RGB", size,
                                                                   pet_colour(class_id, number))
            image.save(images / f"{image_id}.jpg", quality=90)
            Image.new("L", size, 2).save(annotations / "trimaps" / f"{image_id}.png")
            split = "trainval" if number <= n_trainval else "test"
            lines[split].append(f"{image_id} {class_id} {species} {breed_id}\n")
    (annotations / "list.txt").write_text(
        LIST_HEADER + "".join(sorted(lines["trainval"] + lines["test"]))
    )
    (annotations / "trainval.txt").write_text("".join(lines["trainval"]))
    (annotations / "test.txt").write_text("".join(lines["test"]))
    return base


def make_fake_celebahq(
    root: str | Path, n: int = 10, size: int = 32, layout: str = "celebamask-hq", seed: int = 0
) -> list[tuple[int, ...]]:
    """Write ``n`` fake CelebA-HQ faces under ``root``; returns their attributes in {1, -1}.

    ``layout="celebamask-hq"``: ``root/CelebAMask-HQ/CelebA-HQ-img/{0..n-1}.jpg`` and
    ``CelebAMask-HQ-attribute-anno.txt`` (count line, names line, ``"0.jpg  1 -1 ..."`` rows)
    with seeded random attributes; ``layout="folder"``: ``root/{0..n-1}.jpg`` only.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    attributes = [tuple(int(v) for v in rng.choice([-1, 1], len(CELEBA_ATTRIBUTES)))
                  for _ in range(n)]
    folder = root / "CelebAMask-HQ" / "CelebA-HQ-img" if layout == "celebamask-hq" else root
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(n):
        Image.new("RGB", (size, size), face_colour(index)).save(folder / f"{index}.jpg")
    if layout == "celebamask-hq":
        rows = [f"{i}.jpg  " + " ".join(str(v) for v in values)
                for i, values in enumerate(attributes)]
        text = f"{n}\n" + " ".join(CELEBA_ATTRIBUTES) + " \n" + "\n".join(rows) + "\n"
        (root / "CelebAMask-HQ" / "CelebAMask-HQ-attribute-anno.txt").write_text(text)
    return attributes


def make_fake_image_folder(
    root: str | Path, counts: dict[str, int] | None = None, size: tuple[int, int] = (24, 16)
) -> Path:
    """Class folders ``root/<class>/<i>.png`` with ``counts[class]`` flat-colour images (the
    colour's red channel is ``20 * class position``, green ``10 * i``); ``counts=None`` writes
    six flat images straight into ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if counts is None:
        for i in range(6):
            Image.new("RGB", size, (0, 10 * i, 0)).save(root / f"{i}.png")
        return root
    for position, (name, count) in enumerate(sorted(counts.items())):
        (root / name).mkdir(exist_ok=True)
        for i in range(count):
            Image.new("RGB", size, (20 * position, 10 * i, 50)).save(root / name / f"{i}.png")
    return root


def truncate_file(path: str | Path, keep: float = 0.5) -> None:
    """Cut a file to its first ``keep`` fraction of bytes (a broken download)."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])


def write_semantic_maps(root: str | Path, maps: str | Path, boundary: int = 10) -> Path:
    """A one-channel map ``maps/<relative path>.png`` for every PNG image under ``root``:
    class 0 left of column ``boundary``, class 1 from it on, with the image's size. Images it
    is written for are repainted to match: red on class 0, blue on class 1."""
    root, maps = Path(root), Path(maps)
    for path in sorted(root.rglob("*.png")):
        width, height = Image.open(path).size
        labels = np.zeros((height, width), dtype=np.uint8)
        labels[:, boundary:] = 1
        pixels = np.where(labels[..., None] == 1, (0, 0, 255), (255, 0, 0)).astype(np.uint8)
        Image.fromarray(pixels, "RGB").save(path)
        target = (maps / path.relative_to(root)).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(labels, "L").save(target)
    return maps
