"""On-disk cache of autoencoder latents for latent diffusion training.

The first stage is frozen while the diffusion model trains (LDM sec. 3.2), so ``z = E(x)``
of every training image is the same each epoch. Encoding it once and reading ``z`` from
disk afterwards removes the encoder from the training loop.

A cache directory is named by a :class:`CacheKey` (autoencoder weights hash, dataset, split,
transforms, flip), so a new autoencoder or new transforms give a new cache and old latents
are never silently reused. The weights hash is :func:`~ldm_lightning.utils.hashing.file_sha256`
of the checkpoint, or :func:`~ldm_lightning.utils.hashing.state_dict_sha256` of a module
built in memory. The latents are stored as memory-mapped safetensors shards plus a manifest
written last (:mod:`ldm_lightning.data.latent_shards`), so no process loads the cache whole:
ImageNet's 1.28M latents of 4x32x32 (x2 with flips, ~40 GB) are read on demand and their
pages shared through the page cache by every worker and rank of a node. Every file is written
atomically and validated on load (manifest, key, shard sizes, headers, sha256); anything that
fails is rebuilt, never trusted.

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

import bisect
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ldm_lightning.data.latent_shards import (
    MANIFEST,
    Manifest,
    ShardWriter,
    cache_problem,
    open_shard,
    read_caption,
)
from ldm_lightning.diffusion.latent_norm import LatentStats
from ldm_lightning.utils.hashing import text_sha256

log = logging.getLogger(__name__)

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

    def dirname(self) -> str:
        """``<dataset>-<split>-<digest[:16]>``: the cache directory's name."""
        return f"{self.dataset}-{self.split}-{self.digest()[:16]}"


def cache_path(cache_dir: str | os.PathLike, key: CacheKey) -> Path:
    """The directory of the cache for ``key`` under ``cache_dir``."""
    return Path(cache_dir) / key.dirname()


class LatentCache:
    """Latents of one dataset split, read from their shards on demand.

    Holds the validated manifest and, once items are read, the shards' tensors as views of
    their ``mmap`` (:func:`~ldm_lightning.data.latent_shards.open_shard`): nothing is loaded
    whole. Pickling (for spawned DataLoader workers and ranks) drops the opened shards, so a
    pickled cache is a few kilobytes and each process maps the files again.

    Attributes:
        key: what the latents were computed from.
        path: the cache directory.
        manifest: its :class:`~ldm_lightning.data.latent_shards.Manifest`.
        mean, std: ``[C]`` per-channel statistics over all stored latents (both flips).
    """

    def __init__(self, key: CacheKey, path: Path, manifest: Manifest) -> None:
        self.key = key
        self.path = path
        self.manifest = manifest
        self.mean = torch.tensor(manifest.mean)
        self.std = torch.tensor(manifest.std)
        counts = [s.count for s in manifest.shards]
        self._starts = [sum(counts[:i]) for i in range(len(counts))]
        self._shards: dict[int, dict[str, Tensor]] = {}
        self._numpy: dict[int, dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.manifest.count

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_shards": {}, "_numpy": {}}

    @property
    def has_flipped(self) -> bool:
        """Whether ``E(flip(x))`` is stored beside ``E(x)`` (``key.flip``)."""
        return self.manifest.flip

    @property
    def stats(self) -> LatentStats:
        """Statistics of all stored latents (both flips), from the per-channel mean and std."""
        shape = self.manifest.latent_shape
        per_channel = len(self) * shape[1] * shape[2] * (2 if self.has_flipped else 1)
        return LatentStats.from_moments(self.mean, self.std, per_channel)

    @property
    def scale_factor(self) -> float:
        """``1 / std`` over all latent entries, so ``scale_factor * z`` has unit variance: the
        rescaling LDM applies before diffusion (appendix G), over the whole cache."""
        return self.stats.inverse_std()

    def shard(self, index: int) -> dict[str, Tensor]:
        """The tensors of shard ``index`` (mapped on first use in this process)."""
        if index not in self._shards:
            self._shards[index] = open_shard(self.path / self.manifest.shards[index].file)
        return self._shards[index]

    def items(self, indices: Sequence[int], flipped: Sequence[bool] | None = None,
              ) -> tuple[Tensor, list[int], list[str]]:
        """Latents ``[B, C, h, w]`` (storage dtype, copied out of the mapped files), labels and
        captions of items ``indices``; ``flipped[b]`` reads ``E(flip(x))`` for item ``b``.

        A loop of numpy row copies: a few microseconds an item, where per-item torch
        indexing costs several times that."""
        n = len(self)
        latents = torch.empty((len(indices), *self.manifest.latent_shape),
                              dtype=getattr(torch, self.manifest.dtype))
        out = latents.reshape(len(indices), -1).view(torch.uint8).numpy()
        labels, captions = [], []
        for b, index in enumerate(indices):
            if not -n <= index < n:
                raise IndexError(f"index {index} out of range for a cache of {n} latents")
            index %= n
            shard_index = bisect.bisect_right(self._starts, index) - 1
            views, row = self._views(shard_index), index - self._starts[shard_index]
            out[b] = views["latents_flipped" if flipped is not None and flipped[b]
                           else "latents"][row]
            labels.append(int(views["labels"][row]))
            captions.append(read_caption(views, row))
        return latents, labels, captions

    def _views(self, index: int) -> dict[str, np.ndarray]:
        """Shard ``index`` as numpy views (latents as rows of bytes), made once per process."""
        if index not in self._numpy:
            self._numpy[index] = {
                name: t.reshape(t.shape[0], -1).view(torch.uint8).numpy() if t.ndim == 4
                else t.numpy() for name, t in self.shard(index).items()}
        return self._numpy[index]

    def read(self, name: str) -> Tensor:
        """A whole field (``latents``, ``latents_flipped``, ``labels``) concatenated in memory:
        for small caches, checks and analysis, never for training on a large one."""
        if name not in ("latents", "latents_flipped", "labels") or (
                name == "latents_flipped" and not self.has_flipped):
            raise KeyError(f"no field {name!r} in {self.path} (flip={self.has_flipped})")
        return torch.cat([self.shard(i)[name] for i in range(len(self.manifest.shards))])

    def captions(self) -> list[str]:
        """Every caption in item order."""
        return [read_caption(self._views(i), row)
                for i, info in enumerate(self.manifest.shards) for row in range(info.count)]

    @classmethod
    def load(cls, path: str | os.PathLike, expected_key: CacheKey,
             expected_length: int | None = None, checksum: bool = True) -> LatentCache | None:
        """Open and validate a cache directory; None (with a logged reason) if it cannot be trusted.

        Checked: the manifest exists (a build killed between shards leaves none) and parses,
        its format version, its key equals ``expected_key``, ``N == expected_length`` when
        given, and every shard (size, key digest and index in its metadata, tensor shapes and,
        when ``checksum``, its sha256: a full read of the cache).
        """
        path = Path(path)
        if not (path / MANIFEST).is_file():
            log.info("no complete latent cache at %s (no %s)", path, MANIFEST)
            return None
        try:
            manifest = Manifest.read(path)
        except (ValueError, OSError) as err:
            log.warning("latent cache %s has an unusable manifest (%s); it will be rebuilt",
                        path, err)
            return None
        reason = cache_problem(path, manifest, expected_key.to_dict(), expected_key.digest(),
                               expected_length, checksum)
        if reason is not None:
            log.warning("latent cache %s is invalid: %s; it will be rebuilt", path, reason)
            return None
        return cls(expected_key, path, manifest)


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
    shard_size: int | None = None,
) -> LatentCache:
    """Encode every image of ``dataset`` in order (no shuffle) under ``torch.inference_mode``
    and write the latents as shards into the directory ``path`` as they come.

    With ``key.flip`` each image is also encoded mirrored: ``E(flip(x))`` is stored
    beside ``E(x)`` because a horizontal flip of the image is not a flip of its latent in
    general (a conv encoder is only approximately flip-equivariant, a VQ code not at all).
    Memory is one shard (``shard_size`` latents; default about 64 MiB), whatever the dataset.
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
    writer = ShardWriter(path, key.digest(), shard_size)
    stats = None
    with torch.inference_mode():
        for images, labels, captions in loader:
            latents = _encode(encode_fn, images, device).to(dtype)
            flipped = (_encode(encode_fn, images.flip(-1), device).to(dtype) if key.flip
                       else None)
            batch = LatentStats.of(z for z in (latents, flipped) if z is not None)
            stats = batch if stats is None else stats + batch
            writer.add(latents, flipped, labels, captions)
    if stats is None:
        raise ValueError(f"dataset {key.dataset}/{key.split} is empty; nothing to cache")
    manifest = writer.finish(key.to_dict(), stats.mean().float(), stats.std().float())
    return LatentCache(key, path, manifest)


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
    shard_size: int | None = None,
) -> LatentCache:
    """Open the valid cache for ``key`` under ``cache_dir``, or encode ``dataset`` and write it.

    Args:
        encode_fn: images ``[B, 3, H, W]`` in [-1, 1] -> latents ``[B, C, h, w]``; must be
            deterministic (the posterior mode of a KL autoencoder, the quantised code of
            a VQ one) and the model in eval mode.
        dataset: yields ``{"image": [3, H, W], "label": int, "caption": str}`` in a fixed
            order with deterministic transforms; random augmentation would be frozen into
            the cache (use ``key.flip`` for flips).
        cache_dir: directory of caches, created if missing; each cache is a subdirectory.
        key: names the cache; see :class:`CacheKey`.
        dtype: storage dtype of the latents (float16 halves memory and disk).
        rank, world_size: only rank 0 encodes and writes, and only rank 0 verifies the
            shards' sha256 (a full read); the other ranks check the manifest and the shards'
            sizes and headers, and raise if the cache is missing or invalid, so call them after
            a barrier that follows rank 0's build.
        shard_size: latents per shard when writing (default: about 64 MiB per shard).

    Returns:
        The cache; ``encode_fn`` is not called when a valid cache already exists. One that
        fails validation (see :meth:`LatentCache.load`) is rebuilt and replaced. A cache in
        the single-file format of earlier versions (``<name>.pt``) is not read: it is
        rebuilt as shards, with a log line naming the old file, which is left in place.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    path = cache_path(cache_dir, key)
    expected_length = len(dataset) if hasattr(dataset, "__len__") else None
    cache = LatentCache.load(path, key, expected_length, checksum=rank == 0)
    if cache is not None:
        return cache
    if rank != 0:
        raise RuntimeError(
            f"rank {rank}: no valid latent cache at {path}. Only rank 0 builds it: call "
            "build_latent_cache on rank 0, then torch.distributed.barrier(), then on the "
            "other ranks (the warning above, if any, says why the cache was rejected)"
        )
    legacy = path.with_name(path.name + ".pt")
    if legacy.is_file():
        log.warning("latent cache %s is in the single-file format of earlier versions, which "
                    "is loaded whole into memory; it is not read but rebuilt as shards in %s "
                    "(delete the old file to free its disk space)", legacy, path)
    cache = encode_dataset(encode_fn, dataset, key, path, batch_size=batch_size,
                           num_workers=num_workers, device=device, dtype=dtype,
                           progress=progress, shard_size=shard_size)
    log.info("wrote latent cache %s: %d latents of shape %s in %d shards", path, len(cache),
             tuple(cache.manifest.latent_shape), len(cache.manifest.shards))
    return cache
