"""Class labels ``0..K-1`` with a null class ``K`` (classifier-free guidance).

``class_route``: ``time`` adds a label embedding of ``K + 1`` entries to the UNet's time
embedding (``class_labels``, as in ADM and DiT); ``context`` cross-attends to a
:class:`~ldm_lightning.nn.condition_encoders.ClassEncoder`'s tokens (``context``, LDM sec. 3.3);
``both``. Always trained jointly with the UNet.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldm_lightning.models.conditioning.base import Conditioning
from ldm_lightning.nn.condition_encoders import ClassEncoder, check_labels

CLASS_ROUTES = ("time", "context", "both")


class ClassConditioning(Conditioning):
    """Labels -> ``class_labels`` [B] and/or class tokens ``context`` [B, num_tokens, width].

    Args:
        num_classes: K, the number of real classes.
        class_route: "time" | "context" | "both".
        width: context width ``D`` of the class tokens (routes "context", "both").
        num_tokens: context tokens per class (routes "context", "both").
        p_uncond: probability of dropping a training label to the null class.
    """

    kind = "class"
    condition = "class"
    batch_key = "label"
    inputs = "labels"

    def __init__(
        self,
        num_classes: int | None = None,
        class_route: str = "time",
        width: int = 128,
        num_tokens: int = 1,
        p_uncond: float = 0.1,
    ) -> None:
        super().__init__(p_uncond)
        if not num_classes or num_classes < 1:
            raise ValueError(
                "model/conditioning=class needs model.conditioning.num_classes (the number of "
                "labels of the dataset, e.g. 18 for shapes)"
            )
        if class_route not in CLASS_ROUTES:
            raise ValueError(
                f"model.conditioning.class_route={class_route!r} is unknown; valid: "
                f"{CLASS_ROUTES}"
            )
        self.num_classes = num_classes
        self.class_route = class_route
        self.classes = (
            ClassEncoder(num_classes, width, num_tokens) if class_route != "time" else None
        )

    def unet_kwargs(self) -> dict[str, int]:
        kwargs = {}
        if self.class_route in ("time", "both"):
            kwargs["num_classes"] = self.num_classes + 1
        if self.classes is not None:
            kwargs["context_dim"] = self.classes.width
        return kwargs

    def check(self, conditions: Tensor | list[int]) -> Tensor:
        return check_labels(conditions, self.num_classes)

    def drop(self, conditions: Tensor, mask: Tensor) -> Tensor:
        return conditions.masked_fill(mask.to(conditions.device), self.num_classes)

    def null(self, n: int, negative_prompts: list[str] | None, unconditional: bool) -> Tensor:
        if negative_prompts is not None:
            raise ValueError("negative prompts need a text-conditional model")
        return torch.full((n,), self.num_classes, dtype=torch.long)

    def encode(self, conditions: Tensor) -> dict[str, Tensor]:
        kwargs = {}
        if self.class_route in ("time", "both"):
            kwargs["class_labels"] = conditions
        if self.classes is not None:
            kwargs["context"] = self.classes(conditions)[0]
        return kwargs

    def wanted(self) -> str:
        return f"labels=[...] in 0..{self.num_classes - 1}"
