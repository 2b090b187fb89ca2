"""Unconditional: no UNet keyword tensors, and a condition at sampling is an error."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ldm_lightning.models.conditioning.base import Conditioning


class NoConditioning(Conditioning):
    """The UNet sees only ``x_t`` and ``t``; there is nothing to drop or guide."""

    kind = "none"

    def __init__(self) -> None:
        super().__init__(p_uncond=0.0)

    @property
    def is_conditional(self) -> bool:
        return False

    def forward(self, batch: dict[str, Any], train: bool) -> dict[str, Tensor]:
        return {}

    def for_sampling(
        self,
        n: int,
        labels: Any = None,
        prompts: list[str] | None = None,
        negative_prompts: list[str] | None = None,
        unconditional: bool = False,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        if labels is not None or prompts is not None:
            raise ValueError(
                "this model is unconditional (model/conditioning=none); sample it without "
                "labels or prompts"
            )
        return {}, {}

    def sampling_inputs(self, batch: dict[str, Any], n: int) -> dict[str, Any]:
        return {}
