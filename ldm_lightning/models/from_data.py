"""What a model config leaves to the data: filled in from the datamodule before the model is built.

A class-conditional config, or the noisy classifier's, may leave ``num_classes`` null; the
datamodule knows it (an image folder's sub-folders, the Pets breeds). Filled here, it is saved
with the checkpoint like any hyperparameter, so the checkpoint alone rebuilds the model. Only
what a null asks for is read from the data, so a config that gives it does not touch data that
is not downloaded yet.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from ldm_lightning.data.interface import DataSource
from ldm_lightning.models.conditioning.build import conditioning_config
from ldm_lightning.models.conditioning.classes import labelled
from ldm_lightning.nn.condition_encoders import ClassEncoder
from ldm_lightning.utils.targets import resolve_class


def fill_from_data(model_cfg: DictConfig, data: DataSource) -> DictConfig:
    """A copy of ``model_cfg`` (a ``conf/model`` config) with its data-decided values filled in:
    the LDM's ``conditioning`` (:meth:`Conditioning.complete`), a class conditioner's
    ``encoder.num_classes`` and the noisy classifier's ``num_classes``."""
    config: dict[str, Any] = OmegaConf.to_container(model_cfg, resolve=True)
    conditioning = config.get("conditioning")
    if isinstance(conditioning, dict):
        cls, arguments = conditioning_config(conditioning)
        extra = {key: conditioning[key] for key in ("_target_", "kind") if key in conditioning}
        config["conditioning"] = {**extra, **cls.complete(arguments, data)}
    encoder = config.get("encoder")
    if (isinstance(encoder, dict) and _is_class_encoder(encoder)
            and encoder.get("num_classes") is None):
        encoder["num_classes"] = labelled(data).num_classes
    if "num_classes" in config and config["num_classes"] is None:
        config["num_classes"] = labelled(data, "the noisy classifier").num_classes
    return OmegaConf.create(config)


def _is_class_encoder(encoder: dict[str, Any]) -> bool:
    target = encoder.get("_target_")
    if target is None:
        return False
    hint = "set model.encoder._target_ to a condition encoder class"
    return issubclass(resolve_class(target, object, "class", hint), ClassEncoder)
