"""The one device resolution of the entry points' ``device=`` key, and where value checks run."""

from __future__ import annotations

import torch

__all__ = ["on_host", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else the CPU; any other name as ``torch.device`` reads it
    (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def on_host(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` lives in host memory, where reading its values is free.

    Checks that read values (a label in range, an end token per row) run only there: on an
    accelerator each would make the host wait for the queued kernels, at every training step.
    The values a training step sees there come from a datamodule and a tokenizer that are
    checked before training (the class count in the handshake, an end token per tokenized
    row); a user's labels and prompts (``sample``, ``evaluate``) are checked on the host.
    """
    return tensor.device.type == "cpu"
