"""The one hashing helper: sha256 identities of files, tensors and module weights.

A hash names what a result was computed from: the autoencoder behind a latent cache, the
feature extractor behind cached FID statistics, the stage a later stage was trained on. The
same bytes always give the same hex digest, on any machine.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

__all__ = ["file_sha256", "state_dict_sha256", "tensors_sha256", "text_sha256"]


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (a checkpoint, exported weights), read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def text_sha256(text: str) -> str:
    """Hex sha256 of ``text`` (UTF-8): the name of a canonical JSON key."""
    return hashlib.sha256(text.encode()).hexdigest()


def _update(digest: hashlib._Hash, tensor: Tensor, name: str | None = None) -> None:
    """Feed ``[name|]dtype|shape|`` and the raw bytes of ``tensor`` (any dtype) to ``digest``."""
    prefix = "" if name is None else f"{name}|"
    digest.update(f"{prefix}{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    digest.update(memoryview(flat.view(torch.uint8).numpy()))


def state_dict_sha256(module: nn.Module | Mapping[str, Tensor]) -> str:
    """Hex sha256 of a module's weights: names, dtypes, shapes and bytes, in sorted order.

    Identifies weights that have no file of their own (a module built in memory, or loaded
    from a checkpoint that also holds optimiser state).
    """
    state = module.state_dict() if isinstance(module, nn.Module) else module
    digest = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        if not isinstance(value, Tensor):
            raise TypeError(f"state_dict entry {name!r} is {type(value).__name__}, not a Tensor")
        _update(digest, value, name)
    return digest.hexdigest()


def tensors_sha256(tensors: Iterable[Tensor | None], text: str = "") -> str:
    """Hex sha256 of each tensor's dtype, shape and bytes in order (None skipped), then ``text``."""
    digest = hashlib.sha256()
    for tensor in tensors:
        if tensor is not None:
            _update(digest, tensor)
    digest.update(text.encode())
    return digest.hexdigest()
