"""A spatial condition from its config, and the record that rebuilds it from a checkpoint.

As for :mod:`~ldm_lightning.models.conditioning.build`: the config names the class with
``_target_`` (``conf/model/spatial/<kind>.yaml``) and the same dict is saved in the checkpoint,
so ``_target_`` must be a :class:`SpatialCondition` subclass of ``ldm_lightning`` or of a module
imported beforehand (nothing else is imported or called). Checkpoints without the key (written
before spatial conditions, or with ``model/spatial=null``) have none.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ldm_lightning.models.spatial.base import SpatialCondition
from ldm_lightning.utils.targets import check_options, resolve_class

CHOOSE = "choose the kind with model/spatial=<inpaint | upscale | semantic> (or null)"


def build_spatial(
    config: Mapping[str, Any] | None,
) -> tuple[SpatialCondition | None, dict[str, Any] | None]:
    """``(module, record)`` of ``config`` (None: no spatial condition, ``(None, None)``);
    ``record`` (``_target_``, ``kind`` and the arguments) is what the checkpoint saves."""
    if config is None:
        return None, None
    arguments = dict(config)
    target = arguments.pop("_target_", None)
    kind = arguments.pop("kind", None)
    if target is None:
        raise ValueError(f"model.spatial has no _target_; {CHOOSE}")
    cls = resolve_class(target, SpatialCondition, "spatial condition class",
                        f"set model.spatial._target_: {CHOOSE}")
    if kind is not None and kind != cls.kind:
        raise ValueError(
            f"model.spatial.kind={kind} does not choose the kind: use model/spatial={kind} "
            f"(this config builds {cls.__name__})"
        )
    check_options(cls, arguments, "spatial")
    module = cls(**arguments)
    return module, {"_target_": f"{cls.__module__}.{cls.__qualname__}", "kind": cls.kind,
                    **arguments}
