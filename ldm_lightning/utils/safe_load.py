"""Reading ``.ckpt`` files without running the code a pickle may name.

A PyTorch checkpoint is a pickle, and a pickle can call any importable function while it is
read (``os.system`` included). ``torch.load(weights_only=True)`` only rebuilds tensors and
plain containers (dict, list, tuple, str, numbers, ...), which is all a checkpoint of this
package holds, so every load path of the package goes through :func:`safe_torch_load`.

Published checkpoints written by old Lightning versions (CompVis' first-stage and LDM
releases among them) use Lightning callback *classes* as the keys of their ``"callbacks"``
entry. Such a key is only a name: :data:`INERT_GLOBALS` maps those names to
:class:`PickledName`, a placeholder class that never runs anything, so these files load
safely too. Anything else that names a global is refused with :class:`UnsafeCheckpointError`,
unless the caller opts in with ``trust=True`` (config key ``trust_checkpoint=true``), which
logs a warning and reads the file with ``weights_only=False``.
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

TRUST_KEY = "trust_checkpoint"


class PickledName:
    """Stands in for a class a checkpoint names but that is never called (a dict key)."""


# Lightning <= 1.x stored callback state under the callback class itself; CompVis' releases
# (e.g. first_stage_models/vq-f4/model.ckpt) carry ModelCheckpoint this way.
INERT_GLOBALS: tuple[str, ...] = tuple(
    f"{package}.callbacks.{module}.{name}"
    for package in ("pytorch_lightning", "lightning.pytorch")
    for module, name in (
        ("model_checkpoint", "ModelCheckpoint"),
        ("early_stopping", "EarlyStopping"),
        ("lr_monitor", "LearningRateMonitor"),
    )
)

_GLOBAL_PATTERNS = (
    re.compile(r"GLOBAL ([\w.]+)"),
    re.compile(r"Unsupported class ([\w.]+)"),
)


class UnsafeCheckpointError(ValueError):
    """A checkpoint needs more than tensors and plain containers to be read."""


def refused_global(error: Exception) -> str | None:
    """The global a ``weights_only`` load refused, read from torch's message (None if absent)."""
    for pattern in _GLOBAL_PATTERNS:
        match = pattern.search(str(error))
        if match:
            return match.group(1)
    return None


def safe_torch_load(path: str | Path, config_key: str = "ckpt_path", trust: bool = False) -> Any:
    """``torch.load(path)`` on the CPU with ``weights_only=True`` (see the module docstring).

    Raises:
        UnsafeCheckpointError: the file names a global that is neither a tensor type, a plain
            container nor one of :data:`INERT_GLOBALS`; the message names it and the opt-in.
    """
    if trust:
        log.warning(
            "%s=%s is loaded with %s=true: its pickle may run any code. Do this only for files "
            "from a source you trust.",
            config_key,
            path,
            TRUST_KEY,
        )
        return torch.load(path, map_location="cpu", weights_only=False)
    inert = [(PickledName, name) for name in INERT_GLOBALS]
    try:
        with torch.serialization.safe_globals(inert):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        name = refused_global(error)
        if name is None:
            raise  # no code was named: a corrupt or foreign file, reported by the caller
        raise UnsafeCheckpointError(
            f"{config_key}={path} was refused: its pickle asks for the global `{name}`, "
            "which loading would import and may call. Checkpoints written by ldm-lightning "
            "hold only tensors and plain containers, so this file was written by other code "
            f"(or was tampered with). If you trust its source, pass {TRUST_KEY}=true (it is "
            "then read with torch.load(weights_only=False) and may run code); better, ask for "
            "its `python -m ldm_lightning.export` folder (model.safetensors + config.json)."
        ) from None
