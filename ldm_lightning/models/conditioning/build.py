"""A conditioning from its config, and the config that rebuilds it from a checkpoint alone.

A config names its class with ``_target_`` (``conf/model/conditioning/<kind>.yaml``) and holds
its arguments. The LDM builds it here, not with ``hydra.utils.instantiate``, because the same
dict is saved in its checkpoint and read back: a name read from a file must neither import nor
call arbitrary code, so ``_target_`` must be a :class:`Conditioning` subclass of
``ldm_lightning`` or of a module that is already imported.

Checkpoints written before the kinds were classes saved ``{kind: none | class | text, ...}``,
possibly with options of the other kinds, which the one class of those days ignored. A config
with ``kind`` and no ``_target_`` is read that way: ``kind`` picks the class (``text`` with
``text_pretrained`` is :class:`PretrainedTextConditioning`) and those options are dropped.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from ldm_lightning.models.conditioning.base import Conditioning
from ldm_lightning.models.conditioning.classes import ClassConditioning
from ldm_lightning.models.conditioning.none import NoConditioning
from ldm_lightning.models.conditioning.pretrained_text import PretrainedTextConditioning
from ldm_lightning.models.conditioning.text import TextConditioning
from ldm_lightning.utils.targets import check_options, resolve_class

KINDS: dict[str, type[Conditioning]] = {
    cls.kind: cls
    for cls in (NoConditioning, ClassConditioning, TextConditioning, PretrainedTextConditioning)
}
# The arguments of the one Conditioning class of earlier versions.
LEGACY_OPTIONS = {
    "p_uncond", "num_classes", "class_route", "width", "num_tokens", "text", "text_ckpt_path",
    "freeze_text", "text_hparams", "text_sha256", "text_pretrained", "text_pretrained_record",
    "trust_checkpoint",
}
CHOOSE = f"choose the kind with model/conditioning=<{' | '.join(KINDS)}>"


def conditioning_class(target: str) -> type[Conditioning]:
    """The :class:`Conditioning` subclass ``target`` (``package.module.Class``) names
    (:func:`~ldm_lightning.utils.targets.resolve_class`: nothing else is imported or called)."""
    return resolve_class(
        target, Conditioning, "conditioning class", f"set model.conditioning._target_: {CHOOSE}"
    )


def _legacy(kind: str, config: dict[str, Any]) -> tuple[type[Conditioning], dict[str, Any]]:
    if kind not in KINDS:
        raise ValueError(f"model.conditioning.kind={kind!r} is unknown; {CHOOSE}")
    cls = KINDS[kind]
    if cls is TextConditioning and (
        config.get("text_pretrained") or config.get("text_pretrained_record")
    ):
        if config.get("text_ckpt_path"):
            raise ValueError(
                "set either model.conditioning.text_ckpt_path (our conditioner, "
                "model/conditioning=text) or text_pretrained (a transformers CLIP text model, "
                "model/conditioning=pretrained_text), not both"
            )
        cls = PretrainedTextConditioning
    accepted = inspect.signature(cls).parameters
    return cls, {k: v for k, v in config.items() if k in accepted or k not in LEGACY_OPTIONS}


def conditioning_config(config: Mapping[str, Any] | None) -> tuple[type[Conditioning], dict]:
    """The class and constructor arguments of a config (of today, or of a checkpoint of
    before; None: unconditional)."""
    arguments = dict(config or {})
    target = arguments.pop("_target_", None)
    kind = arguments.pop("kind", None)
    if target is None:
        return _legacy(kind or "none", arguments)
    cls = conditioning_class(target)
    if kind is not None and kind != cls.kind:
        raise ValueError(
            f"model.conditioning.kind={kind} does not choose the kind of conditioning any more: "
            f"the config group does, e.g. model/conditioning={kind} instead "
            f"(options: {', '.join(KINDS)}); this config builds {cls.__name__}"
        )
    return cls, arguments


def build_conditioning(config: Mapping[str, Any] | None) -> tuple[Conditioning, dict[str, Any]]:
    """Build the conditioning of ``config``; returns ``(module, record)`` where ``record`` is
    the config to save: ``_target_``, ``kind``, the arguments and what rebuilds a loaded
    encoder without its source (:meth:`Conditioning.record`)."""
    cls, arguments = conditioning_config(config)
    check_options(
        cls, arguments, "conditioning",
        "an experiment written for another kind sets them: start from its base experiment (e.g. "
        "+experiment=shapes_ldm) to switch kinds",
    )
    module = cls(**arguments)
    target = f"{cls.__module__}.{cls.__qualname__}"
    return module, {"_target_": target, "kind": cls.kind, **arguments, **module.record()}
