"""The :class:`Sampler` seam: a step rule, its options and its name, and how a config names one
(see the package docstring of :mod:`ldm_lightning.diffusion.samplers`)."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from torch import Tensor

from ldm_lightning.diffusion.processes import NoiseLevel
from ldm_lightning.utils.targets import resolve_class

VARIANCES = ("fixed_small", "fixed_large")

ModelFn = Callable[[Tensor, Tensor], Tensor]
Noise = Callable[[], Tensor]
# guide(x, level, x0, eps) -> (x0, eps): a change to the estimates, e.g. classifier guidance.
Guide = Callable[[Tensor, NoiseLevel, Tensor, Tensor], tuple[Tensor, Tensor]]


class Sampler(ABC):
    """The reverse step x_t -> x_s (s < t) of one sampling algorithm; :func:`sample` runs the loop.

    A subclass implements :meth:`step` and takes its options as constructor arguments. Setting
    the class attribute ``name`` registers it in :data:`SAMPLERS`, so that ``sample(...,
    sampler=name)`` and ``model.sampling.sampler: name`` choose it; a subclass that does not set
    it keeps its parent's name and is chosen by instance or ``_target_`` (:func:`make_sampler`).
    ``zero_endpoint`` picks the grid of :func:`inference_timesteps`; :meth:`reset` clears what
    a multistep method remembers, before each run. A second-order method sets ``order = 2`` and
    implements :meth:`correct`, which :func:`sample` calls with the model's estimates at the
    point :meth:`step` returned (except on the step to the clean level).
    """

    name: ClassVar[str]
    zero_endpoint: ClassVar[bool] = False
    order: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            SAMPLERS[cls.name] = cls

    def reset(self) -> None:  # noqa: B027 - a one-step method has nothing to forget
        """Forget the previous run (:func:`sample` calls it before the first step)."""

    @abstractmethod
    def step(
        self, x: Tensor, x0: Tensor, eps: Tensor, t: NoiseLevel, s: NoiseLevel, noise: Noise
    ) -> Tensor:
        """x_s from x_t = ``x`` and the model's estimates ``x0``, ``eps`` at level ``t``; ``s``
        is the next level (the clean one, alpha = 1 and sigma = 0, on the last step);
        ``noise()`` draws z ~ N(0, I) of x's shape (see the module docstring)."""

    def correct(  # noqa: B027 - only second-order methods have a correction
        self,
        x: Tensor,
        x0: Tensor,
        eps: Tensor,
        x_s: Tensor,
        x0_s: Tensor,
        eps_s: Tensor,
        t: NoiseLevel,
        s: NoiseLevel,
    ) -> Tensor:
        """For ``order = 2``: x_s from the step's estimates at t and those (``x0_s``, ``eps_s``)
        at the point ``x_s`` :meth:`step` returned."""
        raise NotImplementedError


# name -> class, filled by the Sampler subclasses that set a name.
SAMPLERS: dict[str, type[Sampler]] = {}


def check_variance(variance: str) -> None:
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; choose one of: {', '.join(VARIANCES)}")


def check_eta(eta: float) -> None:
    if eta < 0:
        raise ValueError(f"eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like), got {eta}")


def sampler_class(spec: str | Mapping[str, Any]) -> type[Sampler]:
    """The class of a sampler config: a name of :data:`SAMPLERS`, or a dict whose ``_target_``
    names a :class:`Sampler` subclass of ``ldm_lightning`` or of a module already imported
    (:func:`~ldm_lightning.utils.targets.resolve_class`: nothing else is imported or called)."""
    choices = f"choose one of: {', '.join(SAMPLERS)}"
    if isinstance(spec, Mapping):
        return resolve_class(
            spec.get("_target_"), Sampler, "sampler class", f"{choices}, or a Sampler's _target_"
        )
    if spec not in SAMPLERS:
        raise ValueError(f"unknown sampler {spec!r}; {choices}")
    return SAMPLERS[spec]


def make_sampler(spec: str | Mapping[str, Any] | Sampler, **options: Any) -> Sampler:
    """The sampler ``spec`` describes: a :class:`Sampler` as it is, or its class
    (:func:`sampler_class`) built with a dict's options, and for the arguments the dict leaves
    out, those of ``options`` its constructor takes (:func:`sample`'s ``eta`` and ``variance``;
    None: the sampler's own default)."""
    if isinstance(spec, Sampler):
        return spec
    cls = sampler_class(spec)
    accepted = inspect.signature(cls).parameters
    own = {k: v for k, v in spec.items() if k != "_target_"} if isinstance(spec, Mapping) else {}
    unknown = sorted(set(own) - set(accepted))
    if unknown:
        raise ValueError(
            f"sampler {cls.__name__} has no option {', '.join(unknown)}; its options: "
            f"{', '.join(accepted) or 'none'}"
        )
    given = {k: v for k, v in options.items() if k in accepted and v is not None}
    return cls(**{**given, **own})
