"""A stage as a folder with no pickle in it: ``model.safetensors`` + ``config.json``.

``python -m ldm_lightning.export ckpt_path=<any stage .ckpt> out=<dir>`` writes it; every
place that takes a stage checkpoint (``sample``, ``evaluate``, ``model.first_stage.ckpt_path``,
``model.conditioning.text_ckpt_path``) also takes such a folder and builds the same module
from it (:func:`read_export` returns what :func:`~ldm_lightning.models.checkpoints.read_checkpoint`
returns for the ``.ckpt``).

- ``model.safetensors``: the weights the stage runs with (for a run with EMA these are the
  averaged weights, as in the checkpoint's ``state_dict``) and, where an EMA was kept, the
  trained weights before averaging under ``training/<name>``.
- ``config.json``: the stage's ``hyper_parameters`` (for a later stage these include the
  first-stage record: architecture, source file and sha256), its own checkpoint ``entries``
  (its kind and class, ``ldm_lightning_kind`` and ``ldm_lightning_module``, and the LDM's
  ``scale_factor``), ``extra_state`` (the learned tokenizer of a text encoder, as JSON text)
  and where it came from (``source``).
- ``run_config.yaml``: a copy of the training run's resolved config, where the run left one
  (``evaluate`` reads its ``data`` section, as it does beside a ``.ckpt``).

Optimizer, scheduler and loop state are not exported: a folder is for inference and later
stages; resume from the ``.ckpt``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ldm_lightning.utils.atomic import atomic_write, atomic_write_text

FORMAT = "ldm-lightning-export"
VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
RUN_CONFIG_FILE = "run_config.yaml"
TRAINING_PREFIX = "training/"
# What Lightning (and its callbacks) put in a checkpoint to resume training; not exported.
TRAINING_STATE = {
    "epoch",
    "global_step",
    "pytorch-lightning_version",
    "state_dict",
    "loops",
    "callbacks",
    "optimizer_states",
    "lr_schedulers",
    "hparams_name",
    "hyper_parameters",
    "current_model_state",
    "averaging_state",
    "lora_adapters",  # a LoRA fine-tuning's adapters, to resume it; merged into state_dict
}


def _tensors(state: dict[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    # Clones: safetensors refuses tensors that share storage (views of one another).
    return {
        prefix + name: value.detach().cpu().clone().contiguous()
        for name, value in state.items()
        if torch.is_tensor(value)
    }


def write_export(
    checkpoint: dict[str, Any], out_dir: str | Path, source: dict[str, Any] | None = None
) -> Path:
    """Write ``checkpoint`` (a dict read from a stage ``.ckpt``) as an export folder.

    Both files are written atomically; returns ``out_dir``. Raises ``ValueError`` when a
    hyperparameter or checkpoint entry is not JSON (nothing is written then).
    """
    out_dir = Path(out_dir)
    state = checkpoint["state_dict"]
    tensors = _tensors(state)
    averaged = "current_model_state" in checkpoint
    if averaged:
        tensors.update(_tensors(checkpoint["current_model_state"], TRAINING_PREFIX))
    config = {
        "format": FORMAT,
        "version": VERSION,
        "weights": "ema" if averaged else "trained",
        "hyper_parameters": checkpoint.get("hyper_parameters", {}),
        "entries": {k: v for k, v in checkpoint.items() if k not in TRAINING_STATE},
        "extra_state": {k: v for k, v in state.items() if not torch.is_tensor(v)},
        "source": source or {},
    }
    try:
        text = json.dumps(config, indent=2, sort_keys=True)
    except TypeError as error:
        raise ValueError(f"the checkpoint holds a value JSON cannot store: {error}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_dir / WEIGHTS_FILE, "wb") as f:
        f.write(save_safetensors(tensors, metadata={"format": FORMAT}))
    atomic_write_text(out_dir / CONFIG_FILE, text + "\n")
    return out_dir


def is_export(path: str | Path) -> bool:
    """Whether ``path`` is a folder (and so must be an export folder, not a ``.ckpt``)."""
    return Path(path).is_dir()


def read_export(path: str | Path, config_key: str = "ckpt_path") -> dict[str, Any]:
    """The checkpoint dict an export folder stands for (no optimizer or loop state)."""
    folder = Path(path)
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{config_key}={folder} is a folder without {' and '.join(missing)}: point "
            f"{config_key} at a .ckpt file, or at a folder written by "
            "`python -m ldm_lightning.export ckpt_path=<.ckpt> out=<folder>`."
        )
    config = json.loads((folder / CONFIG_FILE).read_text())
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise ValueError(
            f"{config_key}={folder}/{CONFIG_FILE} is not an ldm-lightning export of version "
            f"{VERSION} (format={config.get('format')!r}, version={config.get('version')!r}); "
            "export the checkpoint again with this version of `python -m ldm_lightning.export`."
        )
    tensors = load_safetensors((folder / WEIGHTS_FILE).read_bytes())
    state: dict[str, Any] = {
        name: value for name, value in tensors.items() if not name.startswith(TRAINING_PREFIX)
    }
    state.update(config["extra_state"])
    hparams = config["hyper_parameters"]
    return {**config["entries"], "state_dict": state, "hyper_parameters": hparams}
