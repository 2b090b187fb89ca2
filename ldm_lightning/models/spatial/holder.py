"""The LDM's side of a spatial condition: the backbone called on ``concat[z_t, c]``.

:class:`SpatialHolder` is a mixin of :class:`~ldm_lightning.models.LatentDiffusionModule`: it
builds the condition of ``hparams.spatial`` (recorded there, so the checkpoint alone rebuilds
it), says how many input channels it adds, refuses a latent cache (cached latents carry no
pixels to build conditions from; see :meth:`use_data`), and gives the denoiser every training
and sampling path calls: ``denoiser(x, t, concat=c, **cond) = unet(concat[x, c], t, **cond)``.
The condition travels as the keyword ``concat``, so classifier-free guidance batches its null
with the class/text null like any other keyword tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ldm_lightning.data.interface import DataSource
from ldm_lightning.models.spatial.base import SpatialCondition
from ldm_lightning.models.spatial.build import build_spatial


class SpatialHolder:
    """Mixin: the spatial condition of an LDM (None: the backbone sees ``z_t`` alone)."""

    spatial: SpatialCondition | None
    hparams: Any
    latent_size: int
    unet: Any

    def attach_spatial(self, config: Mapping[str, Any] | None, latent_channels: int) -> int:
        """Build ``self.spatial`` from ``config``, record it in ``hparams.spatial``; returns the
        channels it adds to the backbone's input (0 without one)."""
        self.spatial, self.hparams.spatial = build_spatial(config)
        return self.spatial.channels(latent_channels) if self.spatial is not None else 0

    def use_data(self, data: DataSource) -> None:
        """Refuse a latent cache before any encoding starts: every condition is built from the
        batch's pixels (random masks drawn per step, the low-resolution image, the map), which
        cached latents do not carry; encoding on the fly costs one encoder pass per batch."""
        if self.spatial is not None and getattr(data, "cache_latents", False):
            raise ValueError(
                f"model/spatial={self.spatial.kind} builds its condition from the images, but "
                "data.cache_latents=true serves latents without pixels; set "
                "data.cache_latents=false"
            )
        super().use_data(data)  # type: ignore[misc]

    def encode_condition_image(self, images: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` -> normalised latents of the frozen first stage."""
        with torch.no_grad():
            return self.latents({"image": images.to(self.device)})  # type: ignore[attr-defined]

    def spatial_condition(self, batch: Mapping[str, Any], train: bool) -> dict[str, Tensor]:
        """``{"concat": c}`` of a training batch (dropped at ``p_uncond`` in training), or {}."""
        if self.spatial is None:
            return {}
        condition = self.spatial(batch, self.encode_condition_image, self.latent_size, train)
        return {"concat": condition.to(self.device)}  # type: ignore[attr-defined]

    def spatial_for_sampling(
        self, n: int, inputs: Mapping[str, Tensor] | None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``({"concat": c}, {"concat": null})`` for ``n`` samples of ``inputs`` (1 or n items
        of the kind's pixel inputs); ``({}, {})`` for a model without a spatial condition."""
        if self.spatial is None:
            if inputs is not None:
                raise ValueError(
                    "this model has no spatial condition (trained with model/spatial=null): a "
                    "sample task needs a model trained with model/spatial=<inpaint | upscale | "
                    "semantic>"
                )
            return {}, {}
        if inputs is None:
            raise ValueError(
                f"this model is conditioned on a {self.spatial.kind} input "
                f"(model/spatial={self.spatial.kind}): pass spatial={{"
                f"{', '.join(repr(k) for k in self.spatial.inputs)}: ...}}, or "
                f"{self.spatial.sample_usage} to python -m ldm_lightning.sample"
            )
        cond, uncond = self.spatial.for_sampling(
            n, {k: v.to(self.device) for k, v in inputs.items()},  # type: ignore[attr-defined]
            self.hparams.image_size, self.encode_condition_image, self.latent_size,
        )
        return {"concat": cond}, {"concat": uncond}

    def spatial_examples(self, batch: Mapping[str, Any], n: int) -> dict[str, Any]:
        """``{"spatial": inputs}`` of ``n`` of a batch's items for validation grids, or {}."""
        if self.spatial is None:
            return {}
        return {"spatial": self.spatial.example_inputs(batch, n)}

    def denoiser(
        self, x: Tensor, t: Tensor, concat: Tensor | None = None, **cond: Tensor
    ) -> Tensor:
        """The backbone on ``concat[x, c]`` (channels) at ``t``, with the other keyword tensors."""
        if concat is not None:
            x = torch.cat([x, concat.to(dtype=x.dtype, memory_format=torch.contiguous_format)], 1)
        return self.unet(x, t, **cond)
