"""Render an image folder of digits: a small real-image stand-in for the ``folder_*`` experiments.

Writes ``OUT_DIR/<zero..nine>/<index>.png`` (``--per-class`` images per class, default 150 ->
1500, ``--size`` px squares, default 32), the layout ``data=folder`` reads (class folders ->
labels). Each image is drawn at 4x with Pillow's bundled font (``ImageFont.load_default``; no
system fonts) and downsampled with antialiasing. Per image, at random: font size, rotation
(+-20 deg), position jitter, stroke width, foreground and background colours (a luminance gap
of at least ``MIN_CONTRAST``), a background gradient, mild blur and pixel noise. Deterministic
by ``--seed``: image ``i`` of class ``d`` draws from its own generator seeded ``(seed, d, i)``,
so a folder rendered with more images per class starts with the same images.

    python experiments/make_digit_folder.py /tmp/digits --per-class 150 --size 32 --seed 0
    python experiments/make_digit_folder.py /tmp/digits --sheet /tmp/digits_sheet.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SUPERSAMPLE = 4
MAX_ROTATION = 20.0  # degrees, either way
MIN_CONTRAST = 0.35  # luminance gap between digit and background, in [0, 1]
FONT_HEIGHT = (0.70, 1.0)  # font size as a fraction of the image side (glyphs ~0.7 of it)
MAX_SHIFT = 0.12  # position jitter as a fraction of the side, kept inside the frame
MAX_STROKE = 0.05  # extra stroke width as a fraction of the font size
MAX_BLUR = 0.6  # Gaussian blur radius at the output size, pixels
MAX_NOISE = 6.0  # std of the Gaussian pixel noise, in 0..255 levels

_LUMA = np.array([0.299, 0.587, 0.114])


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(foreground, background) RGB in [0, 1] whose luminances differ by >= MIN_CONTRAST."""
    while True:
        foreground, background = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        if abs(float(_LUMA @ foreground) - float(_LUMA @ background)) >= MIN_CONTRAST:
            return foreground, background


def _glyph_mask(digit: int, canvas: int, rng: np.random.Generator) -> Image.Image:
    """Coverage mask ``L [canvas, canvas]`` of the digit: sized, stroked, rotated, shifted."""
    font_size = int(canvas * rng.uniform(*FONT_HEIGHT))
    font = ImageFont.load_default(size=font_size)
    stroke = int(round(font_size * rng.uniform(0, MAX_STROKE)))
    mask = Image.new("L", (canvas, canvas), 0)
    ImageDraw.Draw(mask).text(
        (canvas / 2, canvas / 2), str(digit), fill=255, font=font, anchor="mm",
        stroke_width=stroke, stroke_fill=255,
    )
    mask = mask.rotate(rng.uniform(-MAX_ROTATION, MAX_ROTATION), Image.Resampling.BICUBIC)
    left, top, right, bottom = mask.getbbox() or (0, 0, canvas, canvas)
    margin = canvas * 0.04
    limit = MAX_SHIFT * canvas
    # Shift uniformly within +-limit, but never push the glyph past the margin.
    dx = rng.uniform(max(-limit, margin - left), min(limit, canvas - margin - right))
    dy = rng.uniform(max(-limit, margin - top), min(limit, canvas - margin - bottom))
    return mask.transform(
        mask.size, Image.Transform.AFFINE, (1, 0, -dx, 0, 1, -dy), Image.Resampling.BILINEAR
    )


def render_digit(digit: int, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB ``size x size`` image of ``digit`` with the module's random variations."""
    canvas = size * SUPERSAMPLE
    foreground, background = _colours(rng)
    # Background: a linear gradient of +-10% around its colour in a random direction.
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.linspace(-1, 1, canvas)
    gradient = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
    strength = rng.uniform(0, 0.1)
    back = np.clip(background + strength * gradient[..., None], 0, 1)
    alpha = np.asarray(_glyph_mask(digit, canvas, rng), dtype=np.float64)[..., None] / 255
    pixels = (alpha * foreground + (1 - alpha) * back) * 255
    image = Image.fromarray(pixels.round().astype(np.uint8), "RGB")
    image = image.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=None)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0, MAX_BLUR)))
    noisy = np.asarray(image, dtype=np.float64) + rng.normal(0, rng.uniform(0, MAX_NOISE),
                                                             (size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8), "RGB")


def make_digit_folder(
    out_dir: str | Path, per_class: int = 150, size: int = 32, seed: int = 0
) -> Path:
    """Write ``out_dir/<class name>/<index:05d>.png``; returns ``out_dir``."""
    if per_class <= 0 or size <= 0:
        raise ValueError(f"per_class and size must be positive, got {per_class} and {size}")
    out_dir = Path(out_dir)
    for digit, name in enumerate(CLASS_NAMES):
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            rng = np.random.default_rng([seed, digit, index])
            render_digit(digit, size, rng).save(folder / f"{index:05d}.png")
    return out_dir


def contact_sheet(root: str | Path, per_class: int = 16, scale: int = 3) -> Image.Image:
    """The first ``per_class`` images of each class folder, one row per class, enlarged."""
    rows = []
    for name in CLASS_NAMES:
        files = sorted((Path(root) / name).glob("*.png"))[:per_class]
        rows.append([Image.open(path).convert("RGB") for path in files])
    side = rows[0][0].width
    sheet = Image.new("RGB", (per_class * side, len(rows) * side), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            sheet.paste(image, (c * side, r * side))
    return sheet.resize((sheet.width * scale, sheet.height * scale), Image.Resampling.NEAREST)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--per-class", type=int, default=150)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sheet", type=Path, default=None,
                        help="also save a contact sheet (16 images per class) to this PNG")
    args = parser.parse_args()
    make_digit_folder(args.out_dir, args.per_class, args.size, args.seed)
    print(f"wrote {args.per_class * len(CLASS_NAMES)} images of {args.size} px to {args.out_dir}")
    if args.sheet is not None:
        contact_sheet(args.out_dir).save(args.sheet)
        print(f"contact sheet: {args.sheet}")


if __name__ == "__main__":
    main()
