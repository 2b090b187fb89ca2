"""The one data<->model handshake: what a model and its datamodule hand each other.

:func:`connect` runs once, before ``trainer.fit`` / ``validate`` / ``test``
(``python -m ldm_lightning.train`` calls it): the model hands the datamodule its
:class:`~ldm_lightning.data.interface.LatentEncoder` (None without a first stage) and receives
the datamodule as its :class:`~ldm_lightning.data.interface.DataSource`. Neither side reaches
into the other through the trainer.
"""

from __future__ import annotations

from ldm_lightning.data.base import ImageDataModule
from ldm_lightning.data.interface import DataSource, LatentEncoder

CONNECT_HINT = (
    "call ldm_lightning.models.connect(model, datamodule) before trainer.fit "
    "(python -m ldm_lightning.train does)"
)


class _SharedLink:
    """A reference that copies of a module share: weight averaging deep-copies the module,
    and must not copy the datamodule (its datasets, its latent cache) with it."""

    def __init__(self, target: DataSource) -> None:
        self.target = target

    def __deepcopy__(self, memo: dict) -> _SharedLink:
        return self


class DataUser:
    """Mixin of every stage: its side of :func:`connect`."""

    _data_link: _SharedLink | None = None

    @property
    def _data(self) -> DataSource | None:
        return self._data_link.target if self._data_link is not None else None

    def latent_encoder(self) -> LatentEncoder | None:
        """What the latent cache encodes with; None for a stage without a frozen first stage."""
        return None

    def use_data(self, data: DataSource) -> None:
        """Receive the data the stage trains on (its batch size, classes, captions, latents)."""
        self._data_link = _SharedLink(data)

    def data_source(self, needed_for: str) -> DataSource:
        """The connected data; without it, a RuntimeError naming ``needed_for`` and the fix."""
        if self._data is None:
            raise RuntimeError(
                f"{type(self).__name__} needs its data for {needed_for}: {CONNECT_HINT}"
            )
        return self._data


def connect(model: DataUser, datamodule: ImageDataModule) -> None:
    """Hand ``model``'s encoder to ``datamodule`` and ``datamodule`` to ``model``."""
    datamodule.use_latent_encoder(model.latent_encoder())
    model.use_data(datamodule)


def training_captions(data: DataSource | None) -> list[str]:
    """The captions of the training split a text encoder learns its tokenizer from."""
    if data is None:
        raise RuntimeError(
            "a text encoder trained from scratch learns its tokenizer from the training "
            f"captions, but no data is connected: {CONNECT_HINT}, or call "
            "encoder.fit_tokenizer(captions) first"
        )
    return data.captions("train")
