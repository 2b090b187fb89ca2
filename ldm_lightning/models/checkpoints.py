"""Reading stage checkpoints with errors that say what was found and what to do.

Every LightningModule of this package stamps its checkpoints with its stage kind
(``"autoencoder"``, ``"conditioner"``, ``"latent_diffusion"``, ``"noisy_classifier"``), so a
later stage that is pointed at the wrong file fails at start with a message, not with a shape
error mid-run.

A stage is read from a ``.ckpt`` file, with ``weights_only=True`` (see
:mod:`ldm_lightning.utils.safe_load`: a file whose pickle names other code is refused unless
``trust=True``), or from an export folder (:mod:`ldm_lightning.models.exported`), which holds
no pickle at all. Both give the same checkpoint dict and so the same module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import pytorch_lightning as pl

from ldm_lightning.models.exported import (
    RUN_CONFIG_FILE,
    WEIGHTS_FILE,
    is_export,
    read_export,
    write_export,
)
from ldm_lightning.utils.atomic import atomic_write_text
from ldm_lightning.utils.hashing import file_sha256
from ldm_lightning.utils.safe_load import UnsafeCheckpointError, safe_torch_load

KIND_KEY = "ldm_lightning_kind"
MODULE_KEY = "ldm_lightning_module"
HOW_TO_MAKE = {
    "autoencoder": "train one with `python -m ldm_lightning.train +experiment=shapes_vq` "
    "(or shapes_kl, pets_vq, ...)",
    "conditioner": "train one with `python -m ldm_lightning.train +experiment=shapes_clip`",
    "latent_diffusion": "train one with `python -m ldm_lightning.train +experiment=shapes_ldm`",
    "noisy_classifier": "train one with `python -m ldm_lightning.train "
    "+experiment=shapes_noisy_classifier`",
}

M = TypeVar("M", bound=pl.LightningModule)


def stamp(checkpoint: dict[str, Any], kind: str, module: pl.LightningModule) -> None:
    """Record the stage kind and class in a checkpoint dict (call from ``on_save_checkpoint``)."""
    checkpoint[KIND_KEY] = kind
    checkpoint[MODULE_KEY] = f"{type(module).__module__}.{type(module).__qualname__}"


def read_checkpoint(
    path: str | Path, config_key: str = "ckpt_path", trust: bool = False
) -> dict[str, Any]:
    """A stage checkpoint dict from a ``.ckpt`` file or an export folder, on the CPU.

    Raises ``FileNotFoundError``/``ValueError`` naming ``config_key`` and the fix for a missing,
    corrupt or foreign file, and :class:`~ldm_lightning.utils.safe_load.UnsafeCheckpointError`
    for a pickle that names code (unless ``trust``).
    """
    path = Path(path)
    if is_export(path):
        return read_export(path, config_key)
    if not path.is_file():
        raise FileNotFoundError(
            f"{config_key}={path} does not exist. Point {config_key} at a .ckpt file written by "
            "`python -m ldm_lightning.train` (see the run directory's checkpoints/ folder) or "
            "at a folder written by `python -m ldm_lightning.export`."
        )
    try:
        checkpoint = safe_torch_load(path, config_key, trust)
    except UnsafeCheckpointError:
        raise
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise ValueError(
            f"{config_key}={path} could not be read as a checkpoint "
            f"({type(error).__name__}: {error}). The file is corrupt or truncated; "
            "point to another checkpoint (e.g. last.ckpt)."
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{config_key}={path} is not a Lightning checkpoint (no 'state_dict').")
    return checkpoint


def stage_sha256(path: str | Path) -> str:
    """Identity of a stage's weights: the sha256 of the ``.ckpt`` or of the export's weights."""
    path = Path(path)
    return file_sha256(path / WEIGHTS_FILE if is_export(path) else path)


def run_config_path(path: str | Path) -> Path:
    """Where the resolved config of the run that trained ``path`` is: ``<run>/config.yaml``
    for ``<run>/checkpoints/x.ckpt``, the export's copy for an export folder."""
    path = Path(path).resolve()
    return path / RUN_CONFIG_FILE if is_export(path) else path.parent.parent / "config.yaml"


def checkpoint_kind(checkpoint: dict[str, Any]) -> str:
    return checkpoint.get(KIND_KEY, "unknown (not written by ldm-lightning)")


def require_kind(
    checkpoint: dict[str, Any], expected: str, path: str | Path, config_key: str = "ckpt_path"
) -> None:
    """Raise a ValueError naming what ``path`` holds when it is not an ``expected`` checkpoint."""
    found = checkpoint_kind(checkpoint)
    if found != expected:
        raise ValueError(
            f"{config_key}={path} is a {found} checkpoint, but an {expected} checkpoint is needed "
            f"here; {HOW_TO_MAKE.get(expected, '')}."
        )


def load_stage(
    cls: type[M],
    path: str | Path,
    kind: str,
    config_key: str = "ckpt_path",
    trust: bool = False,
    **overrides: Any,
) -> M:
    """Check the kind of ``path`` (a ``.ckpt`` or an export folder) and load it as ``cls``
    (on the CPU, in eval mode).

    Builds the module from the checkpoint's saved hyperparameters (``overrides`` win) and loads
    its weights, as ``LightningModule.load_from_checkpoint`` does, but reads the file once.
    """
    checkpoint = read_checkpoint(path, config_key, trust)
    return build_stage(cls, checkpoint, kind, path, config_key, **overrides)


def build_stage(
    cls: type[M],
    checkpoint: dict[str, Any],
    kind: str,
    path: str | Path,
    config_key: str = "ckpt_path",
    **overrides: Any,
) -> M:
    """:func:`load_stage` for a checkpoint dict already read from ``path``."""
    require_kind(checkpoint, kind, path, config_key)
    hparams = {**checkpoint.get("hyper_parameters", {}), **overrides}
    module = cls(**hparams)
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()


class SafeLoading:
    """Mixin for the stage modules: ``load_from_checkpoint`` goes through :func:`load_stage`.

    So the public ``AutoencoderModule.load_from_checkpoint(path)`` (and the other stages')
    checks the stage kind, takes a ``.ckpt`` or an export folder, and never runs a pickle's
    code unless ``trust=True``.
    """

    kind: str

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: str | Path,
        map_location: Any = None,
        trust: bool = False,
        **overrides: Any,
    ) -> Any:
        module = load_stage(cls, checkpoint_path, cls.kind, trust=trust, **overrides)
        return module.to(map_location) if map_location is not None else module


def export_stage(ckpt_path: str | Path, out: str | Path, trust: bool = False) -> Path:
    """Write the export folder (:mod:`~ldm_lightning.models.exported`) of a stage ``.ckpt``
    (or of another export) to ``out``, with a copy of its run's config where there is one."""
    checkpoint = read_checkpoint(ckpt_path, trust=trust)
    source = {
        "ckpt_path": str(ckpt_path),
        "sha256": stage_sha256(ckpt_path),
        "epoch": checkpoint.get("epoch"),
        "global_step": checkpoint.get("global_step"),
    }
    out = write_export(checkpoint, out, source)
    run_config = run_config_path(ckpt_path)
    if run_config.is_file() and run_config.resolve() != (out / RUN_CONFIG_FILE).resolve():
        atomic_write_text(out / RUN_CONFIG_FILE, run_config.read_text())
    return out
