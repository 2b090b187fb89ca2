"""The frozen first stage of a later stage (conditioner, latent diffusion), and its record.

A later stage holds a plain :class:`~ldm_lightning.nn.first_stage.FirstStage` (or the
identity, for pixel space), never the :class:`AutoencoderModule` that trained it: only the
encoder, quantiser or posterior and decoder weights are copied from the autoencoder checkpoint,
not its discriminator or step counter. Which file they came from is recorded in
``hparams.first_stage`` (``ckpt_path``, ``identity``, ``hparams``: the architecture, ``sha256``),
so a checkpoint of the later stage alone rebuilds it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ldm_lightning.data.interface import LatentEncoder
from ldm_lightning.models.checkpoints import read_checkpoint, require_kind, stage_sha256
from ldm_lightning.models.handshake import DataUser
from ldm_lightning.nn.first_stage import FirstStage, IdentityFirstStage, is_first_stage_key

CONFIG_KEY = "model.first_stage.ckpt_path"
PREFIX = "first_stage."
# Entries of a stage checkpoint that hold a state dict (the EMA callback adds the second).
STATE_ENTRIES = ("state_dict", "current_model_state")

__all__ = ["FirstStageHolder", "IdentityFirstStage", "build_first_stage", "load_first_stage"]


def load_first_stage(path: str, trust: bool = False) -> FirstStage:
    """The first stage of the autoencoder checkpoint at ``path`` (a ``.ckpt`` or an export
    folder): its architecture from the saved hyperparameters, its weights without the loss."""
    checkpoint = read_checkpoint(path, CONFIG_KEY, trust)
    require_kind(checkpoint, "autoencoder", path, CONFIG_KEY)
    module = FirstStage.from_config(checkpoint.get("hyper_parameters", {}))
    state = checkpoint["state_dict"]
    module.load_state_dict({k: v for k, v in state.items() if is_first_stage_key(k)})
    return module


def build_first_stage(
    ckpt_path: str | None = None,
    identity: bool = False,
    hparams: dict[str, Any] | None = None,
    sha256: str | None = None,
    channels: int = 3,
    trust_checkpoint: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the frozen first stage and the record of where it came from.

    - ``identity``: pixel space.
    - ``hparams`` given: the architecture only; the weights come with the later stage's
      checkpoint that recorded them (so that checkpoint alone is enough to sample).
    - else ``ckpt_path``: an autoencoder checkpoint (a ``.ckpt`` or an export folder), checked
      for its kind and loaded (refusing a pickle that names code unless ``trust_checkpoint``).

    Returns ``(module, record)`` where ``record`` is the ``first_stage`` config to save, with
    the architecture and the checkpoint file's sha256 filled in.
    """
    record = {"ckpt_path": ckpt_path, "identity": identity, "hparams": hparams, "sha256": sha256}
    if not (identity or hparams is not None or ckpt_path):
        raise ValueError(
            f"{CONFIG_KEY} is not set. Train an autoencoder first "
            "(`python -m ldm_lightning.train +experiment=shapes_vq`) and pass "
            f"{CONFIG_KEY}=<run dir>/checkpoints/last.ckpt, or set "
            "model.first_stage.identity=true for pixel-space diffusion."
        )
    # Its weights come from a file, so building it draws no random numbers: the later stage's
    # own initialisation depends on the seed alone, whatever the first stage.
    with torch.random.fork_rng(devices=[]):
        if identity:
            module: nn.Module = IdentityFirstStage(channels)
            record["sha256"] = "identity"
        elif hparams is not None:
            # Records of earlier versions hold all the autoencoder's hyperparameters.
            module = FirstStage.from_config(hparams)
            record["hparams"] = module.config
        else:
            module = load_first_stage(ckpt_path, trust_checkpoint)
            record["hparams"] = module.config
            record["sha256"] = stage_sha256(ckpt_path)
    module.requires_grad_(False)
    module.eval()
    return module, record


def without_autoencoder_training_keys(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` without the ``first_stage.*`` entries a plain first stage does not have.

    Checkpoints written before the first stage was a plain module held the whole autoencoder
    under ``first_stage.``: its discriminator (``first_stage.loss.*``) and its step counter
    (``first_stage.train_batches``). Everything else is kept as it is.
    """
    return {
        k: v for k, v in state.items()
        if not k.startswith(PREFIX) or is_first_stage_key(k[len(PREFIX):])
    }


class FirstStageHolder(DataUser):
    """Mixin of the stages trained on a frozen first stage (conditioner, latent diffusion).

    Gives them the first stage (:meth:`attach_first_stage`; in eval mode whatever the stage's
    mode), their side of the data handshake (:meth:`latent_encoder`: the latent cache encodes
    with the first stage, keyed on its weights) and the loading of checkpoints that still hold
    a whole autoencoder (:func:`without_autoencoder_training_keys`).
    """

    first_stage: nn.Module
    hparams: Any

    def attach_first_stage(self, config: dict[str, Any] | None) -> None:
        """Build ``self.first_stage`` from ``config`` and record it in ``hparams.first_stage``
        (call after ``save_hyperparameters``)."""
        config = dict(config or {})
        self.first_stage, record = build_first_stage(**config)
        self.hparams.first_stage = {**config, **record}

    def latent_encoder(self) -> LatentEncoder:
        """The first stage's ``encode`` (unnormalised latents, what the latent cache stores),
        keyed on the sha256 of its weights ("identity" in pixel space)."""
        return LatentEncoder(
            encode=torch.no_grad()(self.first_stage.encode),
            cache_key=self.hparams.first_stage["sha256"] or "identity",
            module=self.first_stage,
        )

    def train(self, mode: bool = True) -> Any:
        """Train mode for the stage; the frozen first stage stays in eval mode."""
        super().train(mode)  # type: ignore[misc]
        self.first_stage.eval()
        return self

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for entry in STATE_ENTRIES:
            if entry in checkpoint:
                checkpoint[entry] = without_autoencoder_training_keys(checkpoint[entry])
