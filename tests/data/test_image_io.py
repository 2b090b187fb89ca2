"""Image decoding, RGB conversion, validity checks, the shared transform and the dataset."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from ldm_lightning.data.image_io import (
    ImageRecord,
    ImageRecordDataset,
    build_dataset,
    drop_unreadable,
    image_problem,
    load_rgb,
    to_rgb,
)
from ldm_lightning.data.transforms import ResizeCrop, square_box, to_signed_tensor
from tests.data.fake_layouts import photo_like, truncate_file


def _photo(path: Path, size: tuple[int, int] = (64, 48), seed: int = 0) -> Path:
    photo_like(np.random.default_rng(seed), size).save(path, quality=90)
    return path


# --- RGB conversion -------------------------------------------------------------------------

def test_grayscale_becomes_three_equal_channels() -> None:
    rgb = np.asarray(to_rgb(Image.new("L", (3, 2), 77)))
    assert rgb.shape == (2, 3, 3) and (rgb == 77).all()


def test_alpha_is_composited_over_white() -> None:
    pixels = np.array([[[200, 0, 0, 0], [200, 0, 0, 255], [200, 0, 0, 128]]], dtype=np.uint8)
    rgb = np.asarray(to_rgb(Image.fromarray(pixels, "RGBA"))).astype(int)
    assert rgb[0, 0].tolist() == [255, 255, 255]  # fully transparent -> white, not black
    assert rgb[0, 1].tolist() == [200, 0, 0]
    # over white: a * c + (1 - a) * 255 with a = 128/255
    expected = [round(128 / 255 * c + 127 / 255 * 255) for c in (200, 0, 0)]
    assert np.abs(rgb[0, 2] - expected).max() <= 1


def test_palette_with_and_without_transparency() -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    palette.putdata([0, 1])
    assert np.asarray(to_rgb(palette)).tolist() == [[[10, 20, 30], [40, 50, 60]]]
    palette.info["transparency"] = 1
    assert np.asarray(to_rgb(palette)).tolist() == [[[10, 20, 30], [255, 255, 255]]]


def test_sixteen_bit_grayscale_is_scaled_not_clipped() -> None:
    wide = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16))
    assert wide.mode.startswith("I")
    assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [0, 100, 255]


def test_load_rgb_converts_files_and_applies_exif_orientation(tmp_path: Path) -> None:
    Image.new("L", (8, 4), 90).save(tmp_path / "gray.jpg")
    Image.new("RGBA", (8, 4), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    gray, clear = load_rgb(tmp_path / "gray.jpg"), load_rgb(tmp_path / "clear.png")
    assert gray.mode == clear.mode == "RGB"
    assert np.abs(np.asarray(gray).astype(int) - 90).max() <= 1
    assert (np.asarray(clear) == 255).all()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.new("RGB", (8, 4)).save(tmp_path / "rotated.jpg", exif=exif)
    assert load_rgb(tmp_path / "rotated.jpg").size == (4, 8)


def test_draft_decodes_jpeg_at_the_smallest_scale_still_covering_the_target(
    tmp_path: Path,
) -> None:
    path = _photo(tmp_path / "big.jpg", size=(512, 384))
    assert load_rgb(path).size == (512, 384)
    assert load_rgb(path, draft_size=64).size == (128, 96)  # 1/4: 96 >= 64, 1/8 would be 48
    assert load_rgb(path, draft_size=96).size == (128, 96)
    assert load_rgb(path, draft_size=200).size == (512, 384)  # 1/2 would give 192 < 200
    Image.new("RGB", (512, 384)).save(tmp_path / "big.png")
    assert load_rgb(tmp_path / "big.png", draft_size=64).size == (512, 384)  # PNG: no draft


# --- transform ------------------------------------------------------------------------------

def test_to_signed_tensor_maps_0_255_to_minus_one_one() -> None:
    image = Image.fromarray(np.array([[[0, 51, 255]]], dtype=np.uint8))
    tensor = to_signed_tensor(image)
    assert tensor.shape == (3, 1, 1) and tensor.dtype == torch.float32
    assert torch.allclose(tensor.flatten(), torch.tensor([-1.0, 51 / 127.5 - 1, 1.0]))
    with pytest.raises(ValueError, match="load_rgb"):
        to_signed_tensor(Image.new("L", (1, 1)))


def test_square_box_centre_and_random_offsets() -> None:
    assert square_box(40, 30) == (5.0, 0.0, 35.0, 30.0)
    assert square_box(30, 41) == (0.0, 5.5, 30.0, 35.5)
    torch.manual_seed(0)
    lefts = [square_box(40, 30, random_crop=True)[0] for _ in range(400)]
    assert set(lefts) == set(range(11))  # every integer offset 0..10, nothing else
    counts = np.bincount(lefts)
    assert counts.min() > 15 and counts.max() < 60  # about 400 / 11 = 36 each


@pytest.mark.parametrize(("size", "target"), [((80, 40), 20), ((40, 80), 10), ((20, 10), 20)])
def test_centre_crop_matches_torchvision_resize_then_centercrop(
    size: tuple[int, int], target: int
) -> None:
    """Where torchvision's crop offset is a whole pixel, one resampling of the box gives the
    pixels of resizing the whole image and cropping, up to one 8-bit level (PIL rounds
    between its horizontal and vertical passes), downscaling and upscaling."""
    image = photo_like(np.random.default_rng(1), size)
    reference = T.CenterCrop(target)(
        T.Resize(target, interpolation=T.InterpolationMode.BICUBIC)(image)
    )
    levels = (ResizeCrop(target)(image) - to_signed_tensor(reference)).abs() * 127.5
    assert levels.max() < 1.0 + 1e-4
    assert levels.mean() < 0.25  # most pixels identical


def test_centre_crop_keeps_the_middle_and_random_crop_moves() -> None:
    bands = np.zeros((30, 90, 3), dtype=np.uint8)
    bands[:, :30, 0] = 255  # red | green | blue thirds
    bands[:, 30:60, 1] = 255
    bands[:, 60:, 2] = 255
    image = Image.fromarray(bands)
    centre = ResizeCrop(12)(image)
    assert centre.shape == (3, 12, 12)
    assert torch.allclose(centre[:, :, 2:-2].mean(dim=(1, 2)), torch.tensor([-1.0, 1.0, -1.0]),
                          atol=0.02)
    torch.manual_seed(0)
    seen = {int(ResizeCrop(12, random_crop=True)(image)[:, 6, 6].argmax()) for _ in range(60)}
    assert seen == {0, 1, 2}  # the crop's centre lands in each band
    torch.manual_seed(3)
    box = square_box(90, 30, random_crop=True)
    torch.manual_seed(3)
    expected = to_signed_tensor(image.resize((12, 12), Image.Resampling.BICUBIC, box=box))
    assert torch.equal(ResizeCrop(12, random_crop=True)(image), expected)


def test_flip_mirrors_about_half_of_the_draws() -> None:
    halves = np.zeros((8, 8, 3), dtype=np.uint8)
    halves[:, :4, 0] = 255
    image = Image.fromarray(halves)
    plain = ResizeCrop(8)(image)
    torch.manual_seed(0)
    outputs = [ResizeCrop(8, flip=True)(image) for _ in range(200)]
    flipped = sum(torch.equal(out, plain.flip(-1)) for out in outputs)
    assert sum(torch.equal(out, plain) for out in outputs) + flipped == 200
    assert 70 < flipped < 130


def test_resize_crop_rejects_bad_size() -> None:
    with pytest.raises(ValueError, match="positive"):
        ResizeCrop(0)


# --- validity checks --------------------------------------------------------------------------

def test_image_problem_finds_truncated_non_image_and_missing_files(tmp_path: Path) -> None:
    good = _photo(tmp_path / "good.jpg")
    assert image_problem(good) is None
    truncate_file(_photo(tmp_path / "cut.jpg"), keep=0.8)
    assert "truncated" in image_problem(tmp_path / "cut.jpg")
    (tmp_path / "notes.jpg").write_text("not an image")
    assert "cannot identify" in image_problem(tmp_path / "notes.jpg")
    assert image_problem(tmp_path / "absent.jpg") == "missing file"
    Image.new("RGB", (40, 30)).save(tmp_path / "cut.png")
    truncate_file(tmp_path / "cut.png", keep=0.6)
    assert image_problem(tmp_path / "cut.png") is not None


def test_bytes_after_the_jpeg_end_marker_are_not_a_problem(tmp_path: Path) -> None:
    """The tail check only flags; a full decode decides, so a decodable JPEG is kept."""
    path = _photo(tmp_path / "trailer.jpg")
    path.write_bytes(path.read_bytes() + b"camera trailer" * 200)
    assert load_rgb(path).size == (64, 48)
    assert image_problem(path) is None


def _records(tmp_path: Path) -> list[ImageRecord]:
    paths = [_photo(tmp_path / f"{i}.jpg", seed=i) for i in range(4)]
    truncate_file(paths[1], keep=0.8)
    paths[2].write_text("not an image")
    return [ImageRecord(path, i, f"caption {i}") for i, path in enumerate(paths)]


def test_drop_unreadable_skips_with_one_warning_naming_the_files(tmp_path: Path) -> None:
    records = _records(tmp_path)
    with pytest.warns(UserWarning, match="skipping 2 unreadable image") as caught:
        kept = drop_unreadable(records, "skip")
    assert [record.label for record in kept] == [0, 3]
    message = str(caught[0].message)
    assert "1.jpg" in message and "2.jpg" in message and "0.jpg" not in message


def test_drop_unreadable_error_mode_names_the_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"2 unreadable image.*1\.jpg.*2\.jpg.*on_corrupt=skip"):
        drop_unreadable(_records(tmp_path), "error")
    with pytest.raises(ValueError, match="on_corrupt"):
        drop_unreadable(_records(tmp_path), "ignore")


def test_build_dataset_rejects_a_split_left_empty(tmp_path: Path) -> None:
    (tmp_path / "bad.jpg").write_text("not an image")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="val split.*no readable"):
        build_dataset([ImageRecord(tmp_path / "bad.jpg", 0, "")], ResizeCrop(8), "skip",
                      where="val split")


# --- dataset --------------------------------------------------------------------------------

def test_dataset_yields_the_sample_dict(tmp_path: Path) -> None:
    path = _photo(tmp_path / "a.jpg")
    record = ImageRecord(path, 3, "a photo", {"species": 1, "attributes": (0, 1, 1)})
    sample = ImageRecordDataset([record], ResizeCrop(16))[0]
    assert set(sample) == {"image", "label", "caption", "species", "attributes"}
    assert sample["image"].shape == (3, 16, 16)
    assert sample["image"].min() >= -1.0 and sample["image"].max() <= 1.0
    assert (sample["label"], sample["caption"], sample["species"]) == (3, "a photo", 1)
    assert sample["attributes"].dtype == torch.long
    assert sample["attributes"].tolist() == [0, 1, 1]


def test_decode_failure_falls_back_to_the_next_image_and_warns(tmp_path: Path) -> None:
    """A file that passed (or skipped) the setup check but fails to decode."""
    records = _records(tmp_path)
    dataset = ImageRecordDataset(records, ResizeCrop(8), on_corrupt="skip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sample = dataset[1]
    assert sample["label"] == 3  # 1 (truncated) and 2 (not an image) fall through to 3
    assert dataset.decode_failures == 2
    named = " ".join(str(warning.message) for warning in caught)
    assert "1.jpg" in named and "2.jpg" in named
    assert dataset[0]["label"] == 0 and dataset.decode_failures == 2


def test_decode_failure_in_error_mode_names_the_file(tmp_path: Path) -> None:
    dataset = ImageRecordDataset(_records(tmp_path), ResizeCrop(8), on_corrupt="error")
    with pytest.raises(ValueError, match=r"cannot decode image .*2\.jpg"):
        dataset[2]


def test_dataset_with_no_decodable_image_raises(tmp_path: Path) -> None:
    (tmp_path / "bad.jpg").write_text("not an image")
    dataset = ImageRecordDataset([ImageRecord(tmp_path / "bad.jpg", 0, "")], ResizeCrop(8))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="none of the 1 images"):
        dataset[0]
