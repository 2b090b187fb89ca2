"""Lightning's checkpoint IO with kill-safe writes: the trainer plugin in ``conf/trainer/*.yaml``.

Every checkpoint Lightning writes (``last.ckpt``, the best checkpoint, SLURM's ``hpc_ckpt``)
goes through the trainer's ``CheckpointIO``. Lightning's own ``TorchCheckpointIO`` writes the
target file in place on a local disk, so a kill during the write can leave a truncated
``last.ckpt`` and nothing to resume from; this one writes through
:func:`ldm_lightning.utils.atomic.atomic_torch_save`, so the previous checkpoint stays
readable until the new one is complete.

Reading goes through :func:`ldm_lightning.utils.safe_load.safe_torch_load` (resume with
``ckpt_path=``, and ``trainer.test`` of the best checkpoint): ``weights_only=True``, whatever
Lightning asks for, unless the run sets ``trust_checkpoint=true``.
"""

from __future__ import annotations

import os
from typing import Any

from fsspec.utils import get_protocol
from pytorch_lightning.plugins.io import TorchCheckpointIO

from ldm_lightning.utils.atomic import atomic_torch_save
from ldm_lightning.utils.safe_load import safe_torch_load


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic (temporary file, fsync, rename) and
    whose reads never run a pickle's code unless ``trust`` (config key ``trust_checkpoint``)."""

    def __init__(self, trust: bool = False) -> None:
        super().__init__()
        self.trust = trust

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        # Object stores (s3://, gs://, ...) publish an object whole or not at all: Lightning's
        # upload is already kill-safe there, and os.replace has no meaning for a URL. Lightning
        # also rejects storage_options with its own message.
        if storage_options is not None or get_protocol(str(path)) != "file":
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if get_protocol(str(path)) != "file":
            return super().load_checkpoint(path, map_location, weights_only=not self.trust)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return safe_torch_load(path, "ckpt_path", self.trust)
