"""What the latent diffusion stage asks of a backbone ``eps_theta(z_t, t, c, y)``.

A backbone (:class:`~ldm_lightning.nn.unet.UNetModel`, :class:`~ldm_lightning.nn.dit.DiT`, or
a class of one's own named by ``model.unet._target_``) is a ``torch.nn.Module`` built from
keyword arguments, among them ``in_channels`` and ``out_channels`` (the latent channels), the
conditioning's ``context_dim`` (cross-attention) and ``num_classes`` (labels, null class
included), and, when its constructor takes it, ``input_size`` (the latent height and width).
It is called as ``backbone(x [B, C, H, W], timesteps [B], context=[B, L, D] | None,
class_labels=[B] | None)`` and returns ``[B, C, H, W]``.

A backbone that needs ``H`` and ``W`` to be multiples of some number (a UNet's downsampling,
a transformer's patch size) says so with a class method ``input_multiple(settings)`` taking its
constructor arguments and returning the number and the reason, so that the LDM refuses a
latent size before it builds anything (:func:`input_multiple`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor


def input_multiple(backbone: type, settings: Mapping[str, Any]) -> tuple[int, str]:
    """``(m, reason)``: the backbone class built with ``settings`` takes inputs whose height
    and width are multiples of ``m`` (its ``input_multiple`` class method); ``(1, "")`` (any
    size) for a class without one."""
    method = getattr(backbone, "input_multiple", None)
    return (1, "") if method is None else method(settings)


def check_inputs(
    name: str,
    x: Tensor,
    timesteps: Tensor,
    context: Tensor | None,
    class_labels: Tensor | None,
    *,
    in_channels: int,
    context_dim: int | None,
    num_classes: int | None,
) -> Tensor:
    """Raise a ValueError naming what of a backbone call does not match how it was built
    (``name``, e.g. "UNet", is the backbone in the messages); return ``timesteps`` broadcast
    to ``[B]``.

    ``x`` must be ``[B, in_channels, H, W]``; ``timesteps`` ``[B]`` or a scalar; ``context``
    ``[B, L, context_dim]`` iff ``context_dim`` is set; ``class_labels`` ``[B]`` iff
    ``num_classes`` is set.
    """
    if x.ndim != 4 or x.shape[1] != in_channels:
        raise ValueError(f"x must be [B, {in_channels}, H, W], got shape {tuple(x.shape)}")
    b = x.shape[0]
    if timesteps.ndim == 0:
        timesteps = timesteps.expand(b)
    if timesteps.shape != (b,):
        raise ValueError(
            f"timesteps must be [B] = [{b}] (or a scalar), got shape {tuple(timesteps.shape)}"
        )
    if context_dim is None and context is not None:
        raise ValueError(
            f"a context was passed but this {name} has no cross-attention (context_dim=None); "
            "build it with context_dim set to the conditioner's output width"
        )
    if context_dim is not None:
        if context is None:
            raise ValueError(
                f"this {name} cross-attends to a context [B, L, {context_dim}]; for "
                "unconditional samples pass the conditioner's null context"
            )
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != context_dim:
            raise ValueError(
                f"context must be [B={b}, L, {context_dim}], got {tuple(context.shape)}"
            )
    if (class_labels is None) != (num_classes is None):
        state = "missing" if class_labels is None else "given"
        raise ValueError(
            f"class_labels are required iff num_classes is set "
            f"(num_classes={num_classes}, class_labels {state})"
        )
    if class_labels is not None and class_labels.shape != (b,):
        raise ValueError(
            f"class_labels must be [B] = [{b}], got shape {tuple(class_labels.shape)}"
        )
    return timesteps
