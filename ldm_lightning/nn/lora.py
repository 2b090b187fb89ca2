"""Low-rank adapters (LoRA, Hu et al. 2022) on a backbone's layers, as weight parametrisations.

An adapted layer's weight is ``W = W0 + (alpha / r) B A`` (Hu et al. 2022, eq. 3) with ``W0``
frozen, ``A`` [r, in] random (Kaiming-uniform) and ``B`` [out, r] zero, so training starts from
the base model exactly and only ``A`` and ``B`` learn; a convolution's kernel ``[out, in, k...]``
is adapted as the matrix ``[out, in * k...]``.

The adapters are ``torch.nn.utils.parametrize`` parametrisations of ``weight``, not wrapper
modules (``peft``'s LoRA layers): every read of ``layer.weight`` sees ``W``, including the
UNet's self-attention, which runs its 1x1 convolutions as ``F.linear(x, qkv.weight)`` and so
would bypass a wrapper's forward silently.

A checkpoint must load into the plain backbone, so :func:`merged_state_dict` writes each adapted
layer as ``<layer>.weight = W`` and :func:`adapted_state_dict` goes back for resuming: ``W0``
from the module (the frozen base model), ``A`` and ``B`` from :func:`adapter_state_dict`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

# The attention projections of the UNet (CrossAttention: to_q, to_k, to_v, to_out.0; the
# self-attention AttentionBlock: qkv; both blocks' proj_out) and the DiT (qkv, attn.proj).
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0", "qkv", "proj_out", "attn.proj")
ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
ORIGINAL = "parametrizations.weight.original"
ADAPTER = "parametrizations.weight.0."


class LowRankDelta(nn.Module):
    """The parametrisation ``W0 -> W0 + scaling * (B A).view_as(W0)``, ``scaling = alpha / r``."""

    def __init__(self, weight: Tensor, rank: int, alpha: float) -> None:
        super().__init__()
        self.scaling = alpha / rank
        self.A = nn.Parameter(torch.empty(rank, weight[0].numel(), dtype=weight.dtype))
        self.B = nn.Parameter(torch.zeros(weight.shape[0], rank, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear (and LoRA's code)

    def delta(self, A: Tensor, B: Tensor, like: Tensor) -> Tensor:
        return (self.scaling * (B @ A)).view_as(like)

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.delta(self.A, self.B, weight)


def add_lora(
    module: nn.Module,
    rank: int,
    alpha: float,
    target_modules: Sequence[str] = ATTENTION_PROJECTIONS,
) -> nn.Module:
    """Freeze ``module`` and adapt its Linear/Conv layers whose names end in one of
    ``target_modules`` with LoRA of rank ``rank`` (scale ``alpha / rank``), in place."""
    if rank < 1:
        raise ValueError(f"model.finetune.lora.rank must be at least 1, got {rank}")
    targets = [
        layer for name, layer in module.named_modules()
        if isinstance(layer, ADAPTABLE) and any(
            name == target or name.endswith(f".{target}") for target in target_modules)
    ]
    if not targets:
        raise ValueError(
            f"model.finetune.lora.target_modules={list(target_modules)} names no Linear or "
            f"Conv layer of {type(module).__name__}; name its attention projections, e.g. "
            f"{list(ATTENTION_PROJECTIONS)}"
        )
    module.requires_grad_(False)
    for layer in targets:
        parametrize.register_parametrization(
            layer, "weight", LowRankDelta(layer.weight, rank, alpha)
        )
    return module


def lora_layers(module: nn.Module) -> dict[str, LowRankDelta]:
    """The adapters of ``module`` by the name of the layer they adapt."""
    return {
        name: layer.parametrizations.weight[0] for name, layer in module.named_modules()
        if parametrize.is_parametrized(layer, "weight")
        and isinstance(layer.parametrizations.weight[0], LowRankDelta)
    }


def adapter_state_dict(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """The adapter weights (``<layer>.parametrizations.weight.0.A`` and ``.B``) of a state dict."""
    return {key: value for key, value in state.items() if ADAPTER in key}


def merged_state_dict(
    module: nn.Module, state: Mapping[str, Any], prefix: str = ""
) -> dict[str, Any]:
    """``state`` (``module``'s, its keys under ``prefix``) with every adapted layer as a plain
    one: ``<layer>.weight = W0 + (alpha / r) B A`` from the state's own tensors."""
    merged = {key: value for key, value in state.items() if ADAPTER not in key}
    for name, adapter in lora_layers(module).items():
        key = f"{prefix}{name}"
        original = merged.pop(f"{key}.{ORIGINAL}")
        A, B = state[f"{key}.{ADAPTER}A"], state[f"{key}.{ADAPTER}B"]
        merged[f"{key}.weight"] = original + adapter.delta(A, B, original)
    return merged


def adapted_state_dict(
    module: nn.Module, merged: Mapping[str, Any], adapters: Mapping[str, Tensor], prefix: str = ""
) -> dict[str, Any]:
    """The inverse of :func:`merged_state_dict` for ``module`` (adapted, holding the frozen base
    weights): each adapted layer's merged weight gives way to ``W0`` and its ``adapters``."""
    state = dict(merged)
    for name in lora_layers(module):
        key = f"{prefix}{name}"
        state.pop(f"{key}.weight", None)
        original = module.get_submodule(name).parametrizations.weight.original
        state[f"{key}.{ORIGINAL}"] = original.detach().clone()
        for part in ("A", "B"):
            if f"{key}.{ADAPTER}{part}" not in adapters:
                raise ValueError(
                    f"the checkpoint has no LoRA adapter for {key}: it was written with other "
                    "model.finetune.lora settings; resume with those, or start a new run"
                )
            state[f"{key}.{ADAPTER}{part}"] = adapters[f"{key}.{ADAPTER}{part}"]
    return state
