"""The seam between the LDM and a kind of condition: :class:`Conditioning`.

A conditioning turns a batch (labels, captions) into UNet keyword tensors for training,
dropping each item's condition to the null one with probability ``p_uncond``, and labels or
prompts into the conditional and null keyword tensors of guided sampling (classifier-free
guidance, Ho & Salimans 2022). The LDM calls only this interface; each kind is a subclass
(:mod:`ldm_lightning.models.conditioning`) chosen in YAML by ``_target_``
(``model/conditioning=<kind>``).

A conditional kind says what it conditions on (``condition``: ``"class"``, ``"text"``), the
batch entry it reads (``batch_key``) and the argument of ``LatentDiffusionModule.sample`` that
carries it (``inputs``), and implements four steps: :meth:`check` the given conditions,
:meth:`drop` some to the null one, :meth:`null` conditions for the unconditional branch,
:meth:`encode` conditions into UNet keyword tensors. Training and sampling are written once,
here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from ldm_lightning.data.interface import DataSource
from ldm_lightning.utils.cycling import cycle_to

T = TypeVar("T")


def expand(items: Sequence[T] | Tensor, n: int, what: str) -> list[T] | Tensor:
    """``n`` conditions from ``items``: as given when ``len == n``, else each repeated
    ``n // len`` times in order (``[a, b]``, n=4 -> ``[a, a, b, b]``: one grid row each)."""
    count = len(items)
    if count == 0 or n % count:
        raise ValueError(
            f"got {count} {what} for n={n} samples; pass n {what}, or a number that divides n"
        )
    repeat = n // count
    if isinstance(items, Tensor):
        return items.repeat_interleave(repeat)
    return [item for item in items for _ in range(repeat)]


class Conditioning(nn.Module):
    """Condition -> UNet keyword tensors. See the module docstring.

    Args:
        p_uncond: probability of dropping a training condition to the null one.
    """

    kind: ClassVar[str]  # the option of the config group model/conditioning
    condition: ClassVar[str]  # what samples are conditioned on, in messages: "class", "text"
    batch_key: ClassVar[str]  # the batch entry that holds it: "label", "caption"
    inputs: ClassVar[str]  # the sample() argument that holds it: "labels", "prompts"

    def __init__(self, p_uncond: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"model.conditioning.p_uncond={p_uncond} must be in [0, 1)")
        self.p_uncond = p_uncond

    # ------------------------------------------------------------------ setup
    @property
    def is_conditional(self) -> bool:
        return True

    def unet_kwargs(self) -> dict[str, Any]:
        """Constructor arguments the UNet needs for this conditioning (context_dim, num_classes)."""
        return {}

    def record(self) -> dict[str, Any]:
        """Config entries that rebuild a loaded encoder without its source (a file, the hub)."""
        return {}

    @classmethod
    def complete(cls, config: dict[str, Any], data: DataSource) -> dict[str, Any]:
        """``config`` (this class's arguments) with what the data decides filled in where the
        config leaves it null; called before the model is built."""
        return dict(config)

    def adopt_data(self, data: DataSource) -> dict[str, Any]:
        """Check ``data`` is data this conditioning can train or be scored on (a ValueError
        otherwise) and take from it what the config left open; returns the config entries that
        changed, to be saved with the checkpoint."""
        return {}

    def prepare(self, data: DataSource | None) -> None:
        """Fit what is learned from the data before training (call at the start of fit);
        ``data`` is None when the model was not connected to a datamodule."""

    # ------------------------------------------------------------------ the kind's steps
    def check(self, conditions: Any) -> Any:
        """The conditions of a batch or a caller, checked, in the form :meth:`encode` takes."""
        raise NotImplementedError

    def drop(self, conditions: Any, mask: Tensor) -> Any:
        """``conditions`` with those where ``mask`` [B] bool is True replaced by the null one."""
        raise NotImplementedError

    def null(self, n: int, negative_prompts: list[str] | None, unconditional: bool) -> Any:
        """``n`` conditions of the unconditional branch of guidance."""
        raise NotImplementedError

    def encode(self, conditions: Any) -> dict[str, Tensor]:
        """UNet keyword tensors (``context`` [B, L, D], ``class_labels`` [B]) of ``conditions``."""
        raise NotImplementedError

    def wanted(self) -> str:
        """What a caller must pass, in error messages."""
        return f"{self.inputs}=[...]"

    # ------------------------------------------------------------------ training
    def drop_mask(self, n: int) -> Tensor:
        """``[n]`` bool, each True with probability ``p_uncond`` (condition -> null)."""
        return torch.rand(n) < self.p_uncond

    def forward(self, batch: dict[str, Any], train: bool) -> dict[str, Tensor]:
        """UNet keyword tensors for ``batch`` (training drops conditions at rate p_uncond)."""
        conditions = self.check(batch[self.batch_key])
        if train:
            conditions = self.drop(conditions, self.drop_mask(len(conditions)))
        return self.encode(conditions)

    # ------------------------------------------------------------------ sampling
    def for_sampling(
        self,
        n: int,
        labels: list[int] | Tensor | None = None,
        prompts: list[str] | None = None,
        negative_prompts: list[str] | None = None,
        unconditional: bool = False,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(cond, uncond)`` keyword tensors for ``n`` samples.

        ``labels`` / ``prompts``: n of them, or a number that divides n (each repeated). The
        null condition (class K, empty caption, or ``negative_prompts``) is ``uncond``; with
        ``unconditional=True`` both are the null condition.
        """
        given = {"labels": labels, "prompts": prompts}
        other = next((name for name, v in given.items() if name != self.inputs and v is not None),
                     None)
        if other is not None:
            raise ValueError(
                f"this model is {self.condition}-conditional: pass {self.inputs}=[...], not "
                f"{other}"
            )
        conditions = given.get(self.inputs)
        if conditions is None and not unconditional:
            raise ValueError(
                f"this model is {self.condition}-conditional: pass {self.wanted()}, or "
                "unconditional=True to sample with the null condition"
            )
        if conditions is not None and unconditional:
            raise ValueError("pass either a condition or unconditional=True, not both")
        uncond = self.encode(self.null(n, negative_prompts, unconditional))
        if unconditional:
            return uncond, uncond
        return self.encode(expand(self.check(conditions), n, self.inputs)), uncond

    def sampling_inputs(self, batch: dict[str, Any], n: int) -> dict[str, Any]:
        """Labels/prompts to draw validation samples with (the batch's, cycled to ``n``)."""
        values = batch[self.batch_key]
        return {self.inputs: cycle_to(values.tolist() if torch.is_tensor(values) else values, n)}
