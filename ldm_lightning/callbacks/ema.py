"""An exponential moving average of the weights, updated with one multi-tensor kernel a step.

``W_ema <- decay * W_ema + (1 - decay) * W`` after every optimizer step (the EMA of DDPM and
LDM training; the first update copies the weights). Lightning's ``EMAWeightAveraging`` applies
it through ``AveragedModel``'s per-tensor ``avg_fn``: a few kernel launches per weight tensor, a
few thousand a step for the LDM-4 UNet, which keep a GPU waiting on the host. torch's
``get_ema_multi_avg_fn`` does the same update as one ``torch._foreach_lerp_`` per device and
dtype. Everything else (when to update, swapping the average in for validation and
checkpoints, resuming) is Lightning's.
"""

from __future__ import annotations

from typing import Any

from pytorch_lightning.callbacks import EMAWeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn


class ForeachEMA(EMAWeightAveraging):
    """``EMAWeightAveraging`` with torch's multi-tensor EMA update (module docstring).

    Its checkpoint state is stored under ``EMAWeightAveraging``'s key, so runs saved with either
    callback resume with the other."""

    def __init__(self, decay: float = 0.999, **kwargs: Any) -> None:
        super().__init__(decay=decay, **kwargs)
        del self._kwargs["avg_fn"]  # AveragedModel takes one of avg_fn and multi_avg_fn
        self._kwargs["multi_avg_fn"] = get_ema_multi_avg_fn(decay)

    @property
    def state_key(self) -> str:
        return EMAWeightAveraging.__qualname__
