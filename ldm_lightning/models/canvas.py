"""The latent canvas a latent diffusion model samples on, and the images it starts from.

- Size: an image of side S is a latent of side S / f (f the first stage's downsampling), which
  the backbone must take (a multiple of its ``input_multiple``: the UNet's downsampling, the
  DiT's patch size). A convolutional backbone samples larger canvases than it was trained on,
  as LDM sec. 4.3.2 does for 512-1024 px images from a 256 px model; a DiT recomputes or
  resizes its position embedding (:meth:`~ldm_lightning.nn.dit.DiT.positions`).
- Image-to-image: images are encoded and normalised as training latents are (``z0 =
  normalize(E(x))``) and handed to the sampler as SDEdit's ``x_init``
  (:mod:`~ldm_lightning.diffusion.img2img`).
"""

from __future__ import annotations

from typing import Any

import torch


def latent_size(image_size: int, factor: int, multiple: tuple[int, str], key: str) -> int:
    """``image_size // factor``, refused unless ``image_size`` is a multiple of ``factor`` and
    the latent side a multiple of the backbone's ``multiple`` = ``(m, reason)``; the message
    names the config ``key`` and the nearest valid sizes (multiples of ``factor * m``)."""
    m, reason = multiple
    step = factor * m
    if image_size > 0 and image_size % step == 0:
        return image_size // factor
    below = image_size // step * step
    above = max(below + step, step)
    valid = f"{below} or {above}" if below > 0 else str(above)
    if image_size <= 0:
        problem = "is not a positive size"
    elif image_size % factor:
        problem = f"is not divisible by the first stage's factor f={factor}"
    else:
        size = image_size // factor
        problem = (f"gives latents that the backbone cannot take: latents are {size}x{size} "
                   f"(image_size {image_size} / f {factor}), not divisible by {reason}")
    raise ValueError(
        f"{key}={image_size} {problem}; valid sizes: multiples of {step}, e.g. {valid}"
    )


class Canvas:
    """Mixin of :class:`~ldm_lightning.models.diffusion.LatentDiffusionModule`: the latent size
    of a sampling ``image_size`` and the latents of image-to-image's images."""

    latent_size: int
    backbone_multiple: tuple[int, str]
    first_stage: Any
    hparams: Any

    def canvas(self, image_size: int | None) -> int:
        """The latent side for samples of ``image_size`` px (None: the training size)."""
        if image_size is None:
            return self.latent_size
        return latent_size(image_size, self.first_stage.factor, self.backbone_multiple,
                           "image_size")

    @torch.no_grad()
    def init_latents(self, images: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Normalised latents ``[n, C, h, w]`` (``shape``) of ``images`` ``[n or 1, 3, H, W]`` in
        [-1, 1] (one image serves all n), H = W = the pixel size of ``shape``."""
        n, size = shape[0], shape[-1] * self.first_stage.factor
        if images.ndim != 4 or images.shape[0] not in (1, n) or images.shape[1:] != (3, size, size):
            raise ValueError(
                f"init images must be [1 or {n}, 3, {size}, {size}] in [-1, 1] for {n} samples of "
                f"{size} px, got {tuple(images.shape)}; resize them (image_size sets the size)"
            )
        latents = self.latents({"image": images.to(self.device)})
        return latents.expand(shape)
