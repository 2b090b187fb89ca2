"""Class labels ``0..K-1`` with a null class ``K`` (classifier-free guidance).

``class_route``: ``time`` adds a label embedding of ``K + 1`` entries to the UNet's time
embedding (``class_labels``, as in ADM and DiT); ``context`` cross-attends to a
:class:`~ldm_lightning.nn.condition_encoders.ClassEncoder`'s tokens (``context``, LDM sec. 3.3);
``both``. Always trained jointly with the UNet.

The number of classes comes from the data when the config leaves it null
(:meth:`ClassConditioning.complete`, before the model is built), the class names when training
starts (:meth:`ClassConditioning.adopt_data`); both are saved with the checkpoint, so sampling
takes ``labels=["seven", 3]``: names or indices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ldm_lightning.data.interface import DataSource
from ldm_lightning.models.conditioning.base import Conditioning
from ldm_lightning.nn.condition_encoders import ClassEncoder, check_labels

CLASS_ROUTES = ("time", "context", "both")


class ClassConditioning(Conditioning):
    """Labels -> ``class_labels`` [B] and/or class tokens ``context`` [B, num_tokens, width].

    Args:
        num_classes: K, the number of real classes (None: ``len(class_names)``).
        class_names: the name of each label (None: labels are known by index only).
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
        class_names: Sequence[str] | None = None,
        class_route: str = "time",
        width: int = 128,
        num_tokens: int = 1,
        p_uncond: float = 0.1,
    ) -> None:
        super().__init__(p_uncond)
        if num_classes is None and class_names is not None:
            num_classes = len(class_names)
        if not num_classes or num_classes < 1:
            raise ValueError(
                "model/conditioning=class needs model.conditioning.num_classes (the number of "
                "labels of the dataset, e.g. 18 for shapes; null takes it from the datamodule)"
            )
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"model.conditioning.class_names has {len(class_names)} names for "
                f"num_classes={num_classes}; give one name per class, or null"
            )
        if class_route not in CLASS_ROUTES:
            raise ValueError(
                f"model.conditioning.class_route={class_route!r} is unknown; valid: "
                f"{CLASS_ROUTES}"
            )
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None
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

    @classmethod
    def complete(cls, config: dict[str, Any], data: DataSource) -> dict[str, Any]:
        """``config`` with ``num_classes`` taken from ``data`` where null (the names, which do
        not change the model's shape, are adopted when training starts: :meth:`adopt_data`)."""
        config = dict(config)
        if config.get("num_classes") is None:
            config["num_classes"] = labelled(data).num_classes
        return config

    def adopt_data(self, data: DataSource) -> dict[str, Any]:
        """Check that ``data``'s labels are this model's classes and take their names when the
        model has none; returns the config entries that changed."""
        names = adopt_classes(self.num_classes, self.class_names, data)
        if names != self.class_names:
            self.class_names = names
            return {"class_names": names}
        return {}

    def check(self, conditions: Tensor | Sequence[int | str]) -> Tensor:
        return class_indices(conditions, self.num_classes, self.class_names, self.wanted())

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
        names = f" or names: {', '.join(self.class_names)}" if self.class_names else ""
        return f"labels=[...] in 0..{self.num_classes - 1}{names}"


def labelled(data: DataSource, needed_by: str = "model/conditioning=class") -> DataSource:
    """``data``, or a ValueError when it has no labels."""
    if not data.num_classes:
        raise ValueError(
            f"{needed_by} needs labelled data, but {type(data).__name__} has no "
            "labels (a flat image folder: put the images into one sub-folder per class)"
        )
    return data


def adopt_classes(
    num_classes: int,
    names: Sequence[str] | None,
    data: DataSource,
    config: str = "model.conditioning",
    needed_by: str = "model/conditioning=class",
) -> list[str] | None:
    """The class names of a model with ``num_classes`` classes ``names`` trained or scored on
    ``data``: its own, or the data's where it has none; a ValueError unless the data's labels
    are its classes. For the messages: ``config``, where the model's ``num_classes`` is set, and
    ``needed_by``, what needs labels."""
    theirs = labelled(data, needed_by).class_names
    if num_classes != data.num_classes or (names and theirs and list(names) != list(theirs)):
        raise ValueError(
            f"the model's {num_classes} classes {_listed(names)} are not the data's "
            f"{data.num_classes} {_listed(theirs)}: a class-conditional model trains, samples "
            "and is scored on the labels it was trained with. Use data with the same "
            f"classes, or train a new model ({config}.num_classes: null follows the data)."
        )
    if names is None:
        return list(theirs) if theirs is not None else None
    return list(names)


def class_indices(
    labels: Tensor | Sequence[int | str], num_classes: int, names: Sequence[str] | None,
    wanted: str,
) -> Tensor:
    """``labels`` given by index or by name (``"3"`` is index 3 unless a class is named "3")
    as a long tensor, checked to be in ``0..num_classes-1``; ``wanted`` says what a caller must
    pass, in the message of an unknown name."""
    if torch.is_tensor(labels):
        return check_labels(labels, num_classes)
    indices = []
    for label in labels:
        if isinstance(label, str) and names is not None and label in names:
            indices.append(list(names).index(label))
        elif isinstance(label, str) and not label.strip().lstrip("-").isdigit():
            raise ValueError(f"unknown class name {label!r}; {wanted}")
        else:
            indices.append(int(label))
    return check_labels(indices, num_classes)


def _listed(names: Sequence[str] | None) -> str:
    if not names:
        return "(unnamed)"
    shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    return f"({shown})"
