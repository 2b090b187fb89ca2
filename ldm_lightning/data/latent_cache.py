"""On-disk cache of autoencoder latents for latent diffusion training.

The first stage is frozen while the diffusion model trains (LDM sec. 3.2), so ``z = E(x)``
of every training image is the same each epoch. Encoding it once and reading ``z`` from
memory afterwards removes the encoder from the training loop.

A cache file is named by a :class:`CacheKey` (autoencoder weights hash, dataset, split,
transforms, flip), so a new autoencoder or new transforms give a new file and old latents
are never silently reused. The weights hash is :func:`~ldm_lightning.utils.hashing.file_sha256`
of the checkpoint, or :func:`~ldm_lightning.utils.hashing.state_dict_sha256` of a module
built in memory. Files are written atomically and validated on load (format,
key, shapes, checksum); anything that fails is rebuilt, never trusted.

Typical use (one process)::

    key = CacheKey(autoencoder_hash=file_sha256(ckpt), dataset="shapes", split="train",
                   transforms={"image_size": 32}, flip=True)
    cache = build_latent_cache(ae.encode, dataset, "cache/latents", key)
    ds = LatentDataset(cache, random_flip=True)  # ldm_lightning.data.latent_dataset

With several ranks only rank 0 encodes and writes; the others load after a barrier::

    if rank == 0:
        build_latent_cache(encode_fn, dataset, cache_dir, key, rank=0, world_size=ws)
    torch.distributed.barrier()
    cache = build_latent_cache(encode_fn, dataset, cache_dir, key, rank=rank, world_size=ws)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ldm_lightning.diffusion.latent_norm import LatentStats
from ldm_lightning.utils.atomic import atomic_torch_save
from ldm_lightning.utils.hashing import tensors_sha256, text_sha256

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_FIELDS = ("format_version", "key", "latents", "latents_flipped", "labels", "captions",
           "mean", "std", "sha256")

EncodeFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class CacheKey:
    """Everything the cached latents depend on; its digest names the cache file.

    ``transforms`` holds whatever changes the pixels fed to the encoder (image size,
    crop, normalisation, a dataset version); it must be JSON-serialisable. Two keys are
    equal exactly when their canonical JSON forms are equal.
    """

    autoencoder_hash: str
    dataset: str
    split: str
    transforms: Mapping[str, Any] = field(default_factory=dict)
    flip: bool = False

    def __post_init__(self) -> None:
        for name in ("autoencoder_hash", "dataset", "split"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"CacheKey.{name} must be a non-empty string, got {value!r}")
        for name in ("dataset", "split"):
            if os.sep in getattr(self, name) or "/" in getattr(self, name):
                raise ValueError(
                    f"CacheKey.{name}={getattr(self, name)!r} is used in the file name; "
                    "remove the path separator"
                )
        if not isinstance(self.flip, bool):
            raise TypeError(f"CacheKey.flip must be a bool, got {self.flip!r}")
        self.canonical_json()

    def canonical_json(self) -> str:
        """All fields as JSON with sorted keys and no whitespace."""
        try:
            return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        except TypeError as err:
            raise ValueError(
                f"CacheKey.transforms must be JSON-serialisable (str, int, float, bool, "
                f"None, lists, dicts): {err}"
            ) from err

    def to_dict(self) -> dict[str, Any]:
        """The key as plain JSON types (tuples become lists), as stored in the file."""
        return json.loads(self.canonical_json())

    def digest(self) -> str:
        """Hex sha256 of :meth:`canonical_json`."""
        return text_sha256(self.canonical_json())

    def filename(self) -> str:
        """``<dataset>-<split>-<digest[:16]>.pt``."""
        return f"{self.dataset}-{self.split}-{self.digest()[:16]}.pt"


def cache_path(cache_dir: str | os.PathLike, key: CacheKey) -> Path:
    """Where the cache for ``key`` lives under ``cache_dir``."""
    return Path(cache_dir) / key.filename()


def _checksum(latents: Tensor, latents_flipped: Tensor | None, labels: Tensor,
              captions: list[str]) -> str:
    return tensors_sha256((latents, latents_flipped, labels), json.dumps(captions))


def _channel_stats(latents: Tensor, latents_flipped: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (population) std over all cached latents, [C] each, float32."""
    stats = LatentStats.of(z for z in (latents, latents_flipped) if z is not None)
    return stats.mean().float(), stats.std().float()


@dataclass
class LatentCache:
    """Latents of one dataset split, in memory.

    Attributes:
        key: what the latents were computed from.
        path: the file they were read from or written to.
        latents: ``[N, C, h, w]``, ``E(x_i)`` for the dataset's images in order.
        latents_flipped: ``[N, C, h, w]``, ``E(flip(x_i))``, or None when ``key.flip`` is False.
        labels: ``[N]`` long.
        captions: ``N`` strings.
        mean, std: ``[C]`` per-channel statistics over all stored latents (both flips).
    """

    key: CacheKey
    path: Path
    latents: Tensor
    latents_flipped: Tensor | None
    labels: Tensor
    captions: list[str]
    mean: Tensor
    std: Tensor

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def stats(self) -> LatentStats:
        """Statistics of all stored latents (both flips), from the per-channel mean and std."""
        per_channel = self.latents[:, 0].numel() * (1 if self.latents_flipped is None else 2)
        return LatentStats.from_moments(self.mean, self.std, per_channel)

    @property
    def scale_factor(self) -> float:
        """``1 / std`` over all latent entries, so ``scale_factor * z`` has unit variance: the
        rescaling LDM applies before diffusion (appendix G), over the whole cache."""
        return self.stats.inverse_std()

    def save(self) -> None:
        """Write to :attr:`path` atomically (:func:`~ldm_lightning.utils.atomic.atomic_write`).

        A run killed mid-write leaves only a hidden tmp file, which :meth:`load` never reads.
        """
        payload = {
            "format_version": FORMAT_VERSION,
            "key": self.key.to_dict(),
            "latents": self.latents,
            "latents_flipped": self.latents_flipped,
            "labels": self.labels,
            "captions": list(self.captions),
            "mean": self.mean,
            "std": self.std,
            "sha256": _checksum(self.latents, self.latents_flipped, self.labels, self.captions),
        }
        atomic_torch_save(payload, self.path)

    @classmethod
    def load(cls, path: str | os.PathLike, expected_key: CacheKey,
             expected_length: int | None = None) -> LatentCache | None:
        """Read and validate a cache file; None (with a logged warning) if it cannot be trusted.

        Checked: the file loads (a truncated or corrupt file does not), format version, the
        stored key equals ``expected_key``, shapes agree (``N`` latents, labels, captions;
        flipped latents present exactly when ``key.flip``), ``N == expected_length`` when
        given, and the checksum of the stored latents, labels and captions.
        """
        path = Path(path)
        if not path.is_file():
            log.info("no latent cache at %s", path)
            return None
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure to unpickle means "corrupt"
            log.warning("latent cache %s is corrupt or truncated (%s: %s); it will be rebuilt",
                        path, type(err).__name__, err)
            return None
        reason = _invalid_reason(data, expected_key, expected_length)
        if reason is not None:
            log.warning("latent cache %s is invalid: %s; it will be rebuilt", path, reason)
            return None
        return cls(key=expected_key, path=path, latents=data["latents"],
                   latents_flipped=data["latents_flipped"], labels=data["labels"],
                   captions=data["captions"], mean=data["mean"], std=data["std"])


def _invalid_reason(data: Any, key: CacheKey, expected_length: int | None) -> str | None:
    """Why a loaded payload cannot be used, or None when it is valid."""
    if not isinstance(data, dict) or not set(_FIELDS) <= set(data):
        fields = sorted(data) if isinstance(data, dict) else type(data).__name__
        return f"expected a dict with fields {list(_FIELDS)}, got {fields}"
    if data["format_version"] != FORMAT_VERSION:
        return f"format_version {data['format_version']!r}, expected {FORMAT_VERSION}"
    expected = key.to_dict()
    if data["key"] != expected:
        stored = data["key"] if isinstance(data["key"], dict) else {}
        diff = sorted(k for k in set(expected) | set(stored) if stored.get(k) != expected.get(k))
        return f"stored key differs from the expected key in {diff}"
    latents, flipped, labels = data["latents"], data["latents_flipped"], data["labels"]
    captions, mean, std = data["captions"], data["mean"], data["std"]
    if not isinstance(latents, Tensor) or latents.ndim != 4:
        return "latents are not a [N, C, h, w] tensor"
    n, c = latents.shape[:2]
    if key.flip != isinstance(flipped, Tensor):
        return f"key.flip={key.flip} but latents_flipped is {type(flipped).__name__}"
    if flipped is not None and (flipped.shape != latents.shape or flipped.dtype != latents.dtype):
        return (f"latents_flipped {tuple(flipped.shape)} does not match "
                f"latents {tuple(latents.shape)}")
    if not isinstance(labels, Tensor) or labels.shape != (n,) or labels.dtype != torch.long:
        return f"labels are not a LongTensor [{n}]"
    if not isinstance(captions, list) or len(captions) != n:
        return f"captions are not a list of {n} strings"
    if not all(isinstance(s, Tensor) and s.shape == (c,) for s in (mean, std)):
        return f"mean/std are not tensors of shape [{c}]"
    if expected_length is not None and n != expected_length:
        return f"it holds {n} latents but the dataset has {expected_length} items"
    if data["sha256"] != _checksum(latents, flipped, labels, captions):
        return "checksum mismatch (the stored tensors were altered)"
    return None


def _collate(items: list[dict[str, Any]]) -> tuple[Tensor, Tensor, list[str]]:
    """Batch only what the cache stores, so extra dataset keys never need to collate."""
    try:
        images = torch.stack([item["image"] for item in items])
        labels = torch.tensor([int(item["label"]) for item in items], dtype=torch.long)
        captions = [str(item["caption"]) for item in items]
    except KeyError as err:
        raise ValueError(
            f"dataset items must be dicts with 'image', 'label' and 'caption'; missing {err}"
        ) from err
    return images, labels, captions


def _encode(encode_fn: EncodeFn, images: Tensor, device: torch.device | str) -> Tensor:
    z = encode_fn(images.to(device))
    if not isinstance(z, Tensor) or z.ndim != 4 or z.shape[0] != images.shape[0]:
        got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise ValueError(
            f"encode_fn must map images [B, 3, H, W] to latents [B, C, h, w]; for B="
            f"{images.shape[0]} it returned {got} (return the posterior mode or the "
            "quantised code, not a tuple)"
        )
    return z.to("cpu")


def encode_dataset(
    encode_fn: EncodeFn,
    dataset: Dataset,
    key: CacheKey,
    path: Path,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> LatentCache:
    """Encode every image of ``dataset`` in order (no shuffle) under ``torch.inference_mode``.

    With ``key.flip`` each image is also encoded mirrored: ``E(flip(x))`` is stored
    beside ``E(x)`` because a horizontal flip of the image is not a flip of its latent in
    general (a conv encoder is only approximately flip-equivariant, a VQ code not at all).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating type (float32, float16), got {dtype}")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_collate)
    if progress:
        try:
            from tqdm.auto import tqdm
            loader = tqdm(loader, desc=f"encoding {key.dataset}/{key.split}", unit="batch")
        except ImportError:
            log.info("tqdm not installed; encoding without a progress bar")
    chunks, flipped_chunks, label_chunks, captions = [], [], [], []
    with torch.inference_mode():
        for images, labels, batch_captions in loader:
            chunks.append(_encode(encode_fn, images, device).to(dtype))
            if key.flip:
                flipped_chunks.append(_encode(encode_fn, images.flip(-1), device).to(dtype))
            label_chunks.append(labels)
            captions.extend(batch_captions)
    if not chunks:
        raise ValueError(f"dataset {key.dataset}/{key.split} is empty; nothing to cache")
    shapes = {tuple(z.shape[1:]) for z in chunks}
    if len(shapes) != 1:
        raise ValueError(f"encode_fn returned latents of different shapes {sorted(shapes)}; "
                         "all images of a split must have the same size")
    # torch.cat outside inference mode gives normal tensors that autograd may save later.
    latents = torch.cat(chunks)
    latents_flipped = torch.cat(flipped_chunks) if key.flip else None
    mean, std = _channel_stats(latents, latents_flipped)
    return LatentCache(key=key, path=path, latents=latents, latents_flipped=latents_flipped,
                       labels=torch.cat(label_chunks), captions=captions, mean=mean, std=std)


def build_latent_cache(
    encode_fn: EncodeFn,
    dataset: Dataset,
    cache_dir: str | os.PathLike,
    key: CacheKey,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> LatentCache:
    """Load the valid cache for ``key`` from ``cache_dir``, or encode ``dataset`` and write it.

    Args:
        encode_fn: images ``[B, 3, H, W]`` in [-1, 1] -> latents ``[B, C, h, w]``; must be
            deterministic (the posterior mode of a KL autoencoder, the quantised code of
            a VQ one) and the model in eval mode.
        dataset: yields ``{"image": [3, H, W], "label": int, "caption": str}`` in a fixed
            order with deterministic transforms; random augmentation would be frozen into
            the cache (use ``key.flip`` for flips).
        cache_dir: directory of cache files, created if missing.
        key: names the file; see :class:`CacheKey`.
        dtype: storage dtype of the latents (float16 halves memory and disk).
        rank, world_size: only rank 0 encodes and writes. Other ranks only load and raise
            if the file is missing or invalid, so call them after a barrier that follows
            rank 0's build.

    Returns:
        The cache; ``encode_fn`` is not called when a valid file already exists. A file
        that fails validation (see :meth:`LatentCache.load`) is rebuilt and replaced.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    path = cache_path(cache_dir, key)
    expected_length = len(dataset) if hasattr(dataset, "__len__") else None
    cache = LatentCache.load(path, key, expected_length)
    if cache is not None:
        return cache
    if rank != 0:
        raise RuntimeError(
            f"rank {rank}: no valid latent cache at {path}. Only rank 0 builds it: call "
            "build_latent_cache on rank 0, then torch.distributed.barrier(), then on the "
            "other ranks (the warning above, if any, says why the file was rejected)"
        )
    cache = encode_dataset(encode_fn, dataset, key, path, batch_size=batch_size,
                           num_workers=num_workers, device=device, dtype=dtype,
                           progress=progress)
    cache.save()
    log.info("wrote latent cache %s: %d latents of shape %s", path, len(cache),
             tuple(cache.latents.shape[1:]))
    return cache
