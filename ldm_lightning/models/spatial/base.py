"""The seam between the LDM and a spatial condition concatenated to its input:
:class:`SpatialCondition`.

LDM sec. 3.3 conditions on spatially aligned inputs (a masked image, a low-resolution image,
a semantic map) by concatenation: the condition ``c`` is brought to the latent resolution and
the backbone sees ``concat[z_t, c]`` along the channels, so its ``in_channels`` grow by
``c``'s channel count (sec. 4.3-4.5; Fig. 8 semantic synthesis, Fig. 10 super-resolution,
Tab. 7 inpainting). This is orthogonal to the class/text conditioning of
:mod:`ldm_lightning.models.conditioning` (cross-attention, time embedding): a model may have
both.

A kind says which pixel inputs it is built from (``inputs``: e.g. ``("image", "mask")``), how
to take them from a training batch (:meth:`batch_inputs`), how to check given ones
(:meth:`check`), its null inputs (:meth:`null_inputs`: what training drops a condition to with
probability ``p_uncond``, the unconditional branch of classifier-free guidance, Ho & Salimans
2022), and how they become the latent-resolution condition (:meth:`encode`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

Inputs = dict[str, Tensor]
# images [B, 3, H, W] in [-1, 1] -> normalised latents [B, C, h, w] of the model's first stage
Encode = Callable[[Tensor], Tensor]


class SpatialCondition(nn.Module):
    """Pixel inputs -> a condition ``[B, channels, h, w]`` at the latent resolution.

    Args:
        p_uncond: probability of dropping a training condition to the null one (classifier-free
            guidance over the condition; 0: never).
    """

    kind: ClassVar[str]  # the option of the config group model/spatial and the sample task
    inputs: ClassVar[tuple[str, ...]]  # the keys of its pixel inputs
    sample_usage: ClassVar[str]  # how the sample CLI gives them, in messages
    data_hint: ClassVar[str] = "a dataset whose items have it"  # what data gives the batch key

    def __init__(self, p_uncond: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"model.spatial.p_uncond={p_uncond} must be in [0, 1)")
        self.p_uncond = p_uncond

    def channels(self, latent_channels: int) -> int:
        """Channels the condition adds to the backbone's input."""
        raise NotImplementedError

    def batch_inputs(self, batch: Mapping[str, Any], train: bool) -> Inputs:
        """The pixel inputs of a training batch (a fixed draw of random parts unless
        ``train``)."""
        raise NotImplementedError

    def check(self, inputs: Mapping[str, Tensor], image_size: int) -> Inputs:
        """``inputs`` checked (a ValueError naming the problem and the fix), as float/long
        tensors with a batch dimension."""
        raise NotImplementedError

    def null_inputs(self, like: Inputs) -> Inputs:
        """The null inputs of the same shapes as ``like``."""
        raise NotImplementedError

    def encode(self, inputs: Inputs, encode: Encode, latent_size: int) -> Tensor:
        """The condition ``[B, channels, latent_size, latent_size]`` of checked inputs."""
        raise NotImplementedError

    # ------------------------------------------------------------------ written once
    def require(self, batch: Mapping[str, Any], key: str) -> Tensor:
        """``batch[key]``, or a ValueError saying what gives it."""
        if key not in batch:
            hint = (
                "data.cache_latents=false: cached latents carry no pixels"
                if "latent" in batch else self.data_hint
            )
            raise ValueError(
                f"model/spatial={self.kind} builds its condition from the batch's {key!r}, "
                f"which this batch lacks (keys: {sorted(batch)}); use {hint}"
            )
        return batch[key]

    def forward(
        self, batch: Mapping[str, Any], encode: Encode, latent_size: int, train: bool
    ) -> Tensor:
        """The condition of a training batch; in training each item is dropped to the null
        condition with probability ``p_uncond``."""
        inputs = self.batch_inputs(batch, train)
        if train and self.p_uncond:
            drop = torch.rand(len(next(iter(inputs.values())))) < self.p_uncond
            inputs = self.dropped(inputs, drop)
        return self.encode(inputs, encode, latent_size)

    def dropped(self, inputs: Inputs, drop: Tensor) -> Inputs:
        """``inputs`` with the items where ``drop`` [B] bool is True replaced by the null ones."""
        null = self.null_inputs(inputs)
        return {
            key: torch.where(drop.to(value.device).view(-1, *[1] * (value.ndim - 1)),
                             null[key], value)
            for key, value in inputs.items()
        }

    def for_sampling(
        self, n: int, inputs: Mapping[str, Tensor], image_size: int, encode: Encode,
        latent_size: int,
    ) -> tuple[Tensor, Tensor]:
        """``(cond, uncond)`` ``[n, channels, h, w]`` of checked ``inputs`` with 1 or ``n`` items
        (one is repeated) and of the null inputs."""
        inputs = self.check(inputs, image_size)
        count = len(next(iter(inputs.values())))
        if count not in (1, n):
            raise ValueError(
                f"the {self.kind} condition has {count} items for {n} samples; give 1 or {n}"
            )
        inputs = {k: v.expand(n, *v.shape[1:]) for k, v in inputs.items()}
        null = self.null_inputs(inputs)
        return self.encode(inputs, encode, latent_size), self.encode(null, encode, latent_size)

    def example_inputs(self, batch: Mapping[str, Any], n: int) -> Inputs:
        """The fixed inputs of ``n`` samples of a batch's items (cycled), for validation grids."""
        inputs = self.batch_inputs(batch, train=False)
        index = torch.arange(n) % len(next(iter(inputs.values())))
        return {key: value[index] for key, value in inputs.items()}


def check_size(name: str, value: Tensor, size: int, fix: str) -> None:
    """A ValueError unless ``value`` ``[..., H, W]`` is ``size x size``."""
    if tuple(value.shape[-2:]) != (size, size):
        raise ValueError(
            f"{name} is {value.shape[-1]}x{value.shape[-2]} (WxH), but this model needs "
            f"{size}x{size}; {fix}"
        )
