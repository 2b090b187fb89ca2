"""Can a first stage represent a colour? Encode and decode the PNGs of a folder (e.g. the
instance images of ``make_shapes_concept.py``) and read the shape colour of each image and of its
reconstruction with the shapes checker, printing the PSNR.

    python experiments/bench/first_stage_colours.py <autoencoder ckpt> <folder>
"""

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm_lightning.data.shapes import RENDER_COLOURS
from ldm_lightning.metrics.shapes_checker import coverage, read_image
from ldm_lightning.models import AutoencoderModule
from ldm_lightning.models.checkpoints import load_stage

COLOURS = list(RENDER_COLOURS)


def main(ckpt: str, folder: str) -> None:
    ae = load_stage(AutoencoderModule, ckpt, "autoencoder").eval()
    for path in sorted(Path(folder).glob("*.png")):
        pixels = np.array(Image.open(path).convert("RGB"))
        x = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1
        with torch.no_grad():
            x_hat = ae.decode(ae.encode(x[None]))[0].clamp(-1, 1)
        psnr = 10 * torch.log10(4 / ((x - x_hat) ** 2).mean())
        print(f"{path.name}: {read_image(x, COLOURS)['colour']} {coverage(x)[1].round().tolist()}"
              f" -> reconstruction {read_image(x_hat, COLOURS)['colour']} "
              f"{coverage(x_hat)[1].round().tolist()}, PSNR {psnr:.1f} dB")


if __name__ == "__main__":
    main(*sys.argv[1:3])
