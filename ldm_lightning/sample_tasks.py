"""Sample-time tasks of models with a spatial condition: ``python -m ldm_lightning.sample
task=inpaint | upscale | semantic image=<png> [mask=<png>]``.

:func:`task_inputs` reads and checks the files before any sampling (the checkpoint must have
been trained with ``model/spatial=<task>``; sizes must fit the model) and returns the pixel
inputs of :meth:`LatentDiffusionModule.sample`'s ``spatial``; :func:`finish_task` pastes the
known pixels back over an inpainted sample.

- ``inpaint``: ``image`` an RGB PNG at the model's size; ``mask`` a PNG of the same size, white
  (> 127 in gray) where the image is to be filled. The model fills the masked region from the
  masked image it is conditioned on; the known pixels are then pasted back, so they are kept
  exactly (as the original image's 8-bit PNG), ``x = x_known (1 - m) + x_sampled m``.
- ``upscale``: ``image`` the low-resolution RGB PNG (``image_size / factor`` square).
- ``semantic``: ``image`` the map at the model's size: a palette or 16/32-bit map holds class
  indices, read as an image folder's ``segmentation_dir`` reads them
  (:func:`~ldm_lightning.data.image_io.load_map`); a gray PNG holds class indices too when
  every value is at most K - 1, else, to draw by hand, K classes at K evenly spaced gray
  levels: class ``round(v (K - 1) / 255)`` (K = 2: black 0, white 1).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ldm_lightning.data.image_io import MAP_MODES, load_map, load_rgb
from ldm_lightning.models import LatentDiffusionModule

__all__ = ["TASKS", "finish_task", "task_inputs"]

TASKS = ("inpaint", "upscale", "semantic")


def _rgb(path: str | os.PathLike) -> Tensor:
    """``[1, 3, H, W]`` in [-1, 1]."""
    pixels = np.asarray(load_rgb(path), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(2, 0, 1)[None]


def _gray(path: str | os.PathLike) -> Tensor:
    """``[H, W]`` gray levels 0..255 (float)."""
    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32))


def _class_indices(path: str | os.PathLike, num_classes: int) -> Tensor:
    """``[H, W]`` the classes of a map file (module docstring): an indexed map's values; a gray
    one's values where none exceeds ``num_classes - 1``, else ``num_classes`` evenly spaced
    gray levels."""
    with Image.open(path) as image:
        indexed = image.mode in MAP_MODES and image.mode != "L"
    if indexed:  # palette indices, not the luminance of the palette's colours
        return torch.from_numpy(np.asarray(load_map(path), dtype=np.int64))
    gray = _gray(path)
    if gray.max() <= num_classes - 1:
        return gray.long()
    return (gray * (num_classes - 1) / 255).round().long()


def task_inputs(
    model: LatentDiffusionModule,
    task: str | None,
    image: str | os.PathLike | None = None,
    mask: str | os.PathLike | None = None,
) -> dict[str, Tensor] | None:
    """The checked ``spatial`` inputs (one item) of ``task`` from its files; None without a
    task. A ValueError names what is wrong and the fix."""
    if task is None:
        if image is not None or mask is not None:
            raise ValueError(
                f"image= and mask= are inputs of a task: set task=<{' | '.join(TASKS)}>"
            )
        return None
    if task not in TASKS:
        raise ValueError(f"task={task!r} is unknown; valid: {', '.join(TASKS)}")
    spatial = model.spatial
    if spatial is None or spatial.kind != task:
        trained = "model/spatial=null" if spatial is None else f"model/spatial={spatial.kind}"
        raise ValueError(
            f"task={task} needs a checkpoint trained with model/spatial={task} (e.g. "
            f"+experiment=shapes_{task}); this one was trained with {trained}"
        )
    if image is None:
        raise ValueError(f"task={task} needs its input: {spatial.sample_usage}")
    if (mask is not None) != (task == "inpaint"):
        raise ValueError(f"task={task} takes {spatial.sample_usage}, "
                         f"{'without' if mask is not None else 'with'} mask=")
    if task == "inpaint":
        inputs = {"image": _rgb(image), "mask": (_gray(mask) > 127).float()[None, None]}
    elif task == "upscale":
        inputs = {"image": _rgb(image)}
    else:
        inputs = {"segmentation": _class_indices(image, spatial.num_classes)[None]}
    return spatial.check(inputs, model.hparams.image_size)


def finish_task(images: Tensor, inputs: dict[str, Tensor] | None) -> Tensor:
    """``images`` ``[n, 3, H, W]`` with an inpainting task's known pixels pasted back."""
    if inputs is None or "mask" not in inputs:
        return images
    mask = inputs["mask"].to(images.device)
    return inputs["image"].to(images.device) * (1 - mask) + images * mask
