"""Classes named by a config's ``_target_``, resolved without running code a file names.

Configs choose their parts (optimiser, backbone, condition encoder, conditioning) with
``_target_``, and the same dicts are saved in checkpoints and read back on load. So a name read
from a file must neither import nor call arbitrary code: :func:`resolve_class` looks only in
modules of ``ldm_lightning`` (imported if needed) or in modules already imported (``torch.optim``,
a test module, a plugin the user imported beforehand), and returns only a subclass of the
expected base, before anything is called.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")

PACKAGE = "ldm_lightning"


def resolve_class(target: str, base: type[T], what: str, hint: str) -> type[T]:
    """The subclass of ``base`` that ``target`` (``package.module.Class``) names.

    Only a module of ``ldm_lightning``, or one already in ``sys.modules``, is looked in;
    anything else, or anything that is not a subclass of ``base``, is refused with a
    ValueError before it is called.

    Args:
        target: the dotted name, e.g. ``"torch.optim.AdamW"``.
        base: the class the result must subclass.
        what: the kind of part in words, for the message (e.g. ``"conditioning class"``).
        hint: what to do instead, naming the config key (ends the message).
    """
    module_name, _, name = str(target).rpartition(".")
    found = None
    if module_name.split(".")[0] == PACKAGE or module_name in sys.modules:
        with contextlib.suppress(ImportError):
            found = getattr(importlib.import_module(module_name), name, None)
    if not (isinstance(found, type) and issubclass(found, base)):
        raise ValueError(
            f"{target!r} is not a {what}: a subclass of {base.__module__}.{base.__qualname__} "
            f"in {PACKAGE}, or in a module imported beforehand; {hint}"
        )
    return found


def check_options(cls: type, arguments: Mapping[str, Any], group: str, hint: str = "") -> None:
    """Refuse ``arguments`` that ``cls`` (the class option ``cls.kind`` of the config group
    ``model/<group>``) does not take, naming them and the options it has; ``hint`` (what to do
    instead) ends the message."""
    options = inspect.signature(cls).parameters
    unknown = sorted(set(arguments) - set(options))
    if unknown:
        raise ValueError(
            f"model.{group} has {', '.join(unknown)}, not options of model/{group}={cls.kind} "
            f"({cls.__name__}: {', '.join(options)})" + (f"; {hint}" if hint else "")
        )
