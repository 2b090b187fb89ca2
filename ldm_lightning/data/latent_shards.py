"""The on-disk format of a latent cache: safetensors shards read through ``mmap``, and a manifest.

One cache is one directory::

    shard-00000.safetensors  shard-00001.safetensors  ...   consecutive runs of items
    manifest.json                                           written last: the cache is complete

Shard ``i`` holds ``n_i`` consecutive items as safetensors tensors (its metadata names the
cache key's digest and ``i``, so a shard copied in from another cache is refused):

* ``latents`` ``[n_i, C, h, w]`` and, in flip caches, ``latents_flipped`` of the same shape;
* ``labels`` ``[n_i]`` int64;
* ``caption_bytes`` ``[total]`` uint8, the UTF-8 captions concatenated, and
  ``caption_offsets`` ``[n_i + 1]`` int64: caption ``j`` is ``caption_bytes[off[j]:off[j+1]]``
  (strings as bytes in the file, so no process holds millions of Python strings).

The manifest (JSON) holds the format version, the key, the item count, the latent shape and
dtype, the per-channel mean and std, and for every shard its file name, item count, size and
sha256. Every file goes through :func:`~ldm_lightning.utils.atomic.atomic_write`, and a
(re)build deletes the manifest before it writes its first shard: a build killed between
shards leaves shards but no manifest, which is never taken for a cache.

Why this format: ``safetensors.safe_open`` maps a shard with ``mmap`` and returns tensors that
are views of the mapping (no copy, no unpickling, nothing executed), so the pages of a shard
live once in the OS page cache and are shared by every DataLoader worker and every rank of a
node; the kernel may drop them under memory pressure and read them again. Items are
addressable by index, so the samplers Lightning sets up (shuffle, ``DistributedSampler``)
work unchanged. Shards bound the memory of writing (one shard at a time) and the unit of
verification.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from ldm_lightning.utils.atomic import atomic_write, atomic_write_text
from ldm_lightning.utils.hashing import file_sha256

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
SHARD_BYTES = 64 * 2**20
"""Default shard size: about 64 MiB of latents (flipped twins included) per shard."""


def shard_name(index: int) -> str:
    """``shard-00042.safetensors``."""
    return f"shard-{index:05d}.safetensors"


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the manifest records it."""

    file: str
    count: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What ``manifest.json`` holds; see the module docstring."""

    format_version: int
    key: dict[str, Any]
    count: int
    latent_shape: list[int]
    dtype: str
    flip: bool
    mean: list[float]
    std: list[float]
    shards: list[ShardInfo]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        """Parse ``directory/manifest.json``; raises ``ValueError`` naming what is malformed."""
        data = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
            version = data.get("format_version") if isinstance(data, dict) else None
            raise ValueError(f"format_version {version!r}, expected {FORMAT_VERSION}")
        try:
            shards = [ShardInfo(**shard) for shard in data.pop("shards")]
            manifest = cls(**data, shards=shards)
        except TypeError as err:
            raise ValueError(f"malformed manifest: {err}") from err
        if sum(s.count for s in manifest.shards) != manifest.count:
            raise ValueError(f"shard counts do not add up to {manifest.count}")
        return manifest


def open_shard(path: Path) -> dict[str, Tensor]:
    """All tensors of a shard as zero-copy views of its ``mmap`` (``safetensors.safe_open``)."""
    with safe_open(str(path), framework="pt") as f:
        names = f.keys()  # a safe_open handle is not iterable
        return {name: f.get_tensor(name) for name in names}


def shard_problem(directory: Path, index: int, info: ShardInfo, manifest: Manifest,
                  key_digest: str, checksum: bool) -> str | None:
    """Why shard ``index`` does not match the manifest, or None when it does.

    Checked: the file exists with the recorded size, its sha256 (when ``checksum``), its
    metadata (key digest and index), and the names, shapes and dtypes of its tensors.
    """
    path = directory / info.file
    if info.file != shard_name(index) or not path.is_file():
        return f"shard {info.file} is missing"
    if path.stat().st_size != info.bytes:
        return f"shard {info.file} has {path.stat().st_size} bytes, the manifest says {info.bytes}"
    if checksum and file_sha256(path) != info.sha256:
        return f"shard {info.file}: checksum mismatch (its bytes were altered)"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, names = f.metadata() or {}, f.keys()
            shapes = {name: (list(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype())
                      for name in names}
    except Exception as err:  # noqa: BLE001 - any failure to parse means "corrupt"
        return f"shard {info.file} is unreadable ({type(err).__name__}: {err})"
    if meta.get("key_digest") != key_digest or meta.get("index") != str(index):
        return f"shard {info.file} belongs to another cache (metadata {meta})"
    n, dtype = info.count, _SAFETENSORS_DTYPES.get(manifest.dtype)
    expected = {"latents": ([n, *manifest.latent_shape], dtype), "labels": ([n], "I64"),
                "caption_offsets": ([n + 1], "I64")}
    if manifest.flip:
        expected["latents_flipped"] = expected["latents"]
    got = {name: shapes.get(name) for name in expected}
    if got != expected or shapes.get("caption_bytes", (None, None))[1] != "U8":
        return f"shard {info.file} holds {shapes}, expected {expected} and caption_bytes"
    return None


def cache_problem(directory: Path, manifest: Manifest, key: Mapping[str, Any], key_digest: str,
                  expected_length: int | None, checksum: bool) -> str | None:
    """Why the cache in ``directory`` with this manifest cannot be used for ``key`` (a
    ``CacheKey`` as a dict, and its digest), or None when it is valid."""
    if manifest.key != key:
        stored = manifest.key if isinstance(manifest.key, dict) else {}
        diff = sorted(k for k in set(key) | set(stored) if stored.get(k) != key.get(k))
        return f"stored key differs from the expected key in {diff}"
    if manifest.flip != key["flip"]:
        return f"key.flip={key['flip']} but the manifest says flip={manifest.flip}"
    if expected_length is not None and manifest.count != expected_length:
        return f"it holds {manifest.count} latents but the dataset has {expected_length} items"
    if len(manifest.latent_shape) != 3 or not len(manifest.mean) == len(manifest.std) == (
            manifest.latent_shape[0]):
        return f"latent shape {manifest.latent_shape} and mean/std do not agree"
    for index, info in enumerate(manifest.shards):
        reason = shard_problem(directory, index, info, manifest, key_digest, checksum)
        if reason is not None:
            return reason
    return None


_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


class ShardWriter:
    """Writes items into consecutive shards of ``directory`` as they are encoded.

    Memory is one shard's worth. Creating the writer deletes the directory's manifest, so
    whatever was there stops being a cache until :meth:`finish` writes the new manifest.
    """

    def __init__(self, directory: Path, key_digest: str, shard_size: int | None = None) -> None:
        if shard_size is not None and shard_size <= 0:
            raise ValueError(f"shard_size must be positive (latents per shard), got {shard_size}")
        self.directory = directory
        self.key_digest = key_digest
        self.shard_size = shard_size
        self.shards: list[ShardInfo] = []
        self._layout: tuple[list[int], str, bool] | None = None
        self._pending: list[dict[str, Any]] = []
        self._pending_count = 0
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MANIFEST).unlink(missing_ok=True)

    def add(self, latents: Tensor, flipped: Tensor | None, labels: Tensor,
            captions: Sequence[str]) -> None:
        """Queue a batch: latents ``[B, C, h, w]``, flipped ones (same shape) or None, labels
        ``[B]``, ``B`` captions; write every shard that is full."""
        layout = (list(latents.shape[1:]), str(latents.dtype).removeprefix("torch."),
                  flipped is not None)
        if self._layout not in (None, layout):
            raise ValueError(f"latents of layout {layout} after {self._layout}; all latents of "
                             "a cache must have one shape and dtype")
        self._layout = layout
        if self.shard_size is None:
            per_item = latents[0].numel() * latents.element_size() * (1 if flipped is None else 2)
            self.shard_size = max(1, SHARD_BYTES // per_item)
        self._pending.append({"latents": latents, "latents_flipped": flipped,
                              "labels": labels, "captions": list(captions)})
        self._pending_count += latents.shape[0]
        while self._pending_count >= self.shard_size:
            self._write(self._take(self.shard_size))

    def finish(self, key: dict[str, Any], mean: Tensor, std: Tensor) -> Manifest:
        """Write the last partial shard, remove shards left by an older build, then write the
        manifest: from here on the directory is a complete cache."""
        if self._pending_count:
            self._write(self._take(self._pending_count))
        if not self.shards:
            raise ValueError("no items were added; an empty cache is not written")
        for stale in sorted(self.directory.glob("shard-*.safetensors")):
            if stale.name not in {s.file for s in self.shards}:
                stale.unlink()
        shape, dtype, flip = self._layout
        manifest = Manifest(
            format_version=FORMAT_VERSION, key=key, count=sum(s.count for s in self.shards),
            latent_shape=shape, dtype=dtype, flip=flip, mean=mean.tolist(), std=std.tolist(),
            shards=self.shards,
        )
        atomic_write_text(self.directory / MANIFEST, manifest.to_json())
        return manifest

    def _take(self, n: int) -> dict[str, Any]:
        """The first ``n`` queued items, concatenated; the rest stays queued."""
        fields: dict[str, list] = {"latents": [], "latents_flipped": [], "labels": [],
                                   "captions": []}
        need = n
        while need:
            batch = self._pending[0]
            k = min(need, batch["labels"].shape[0])
            for name, value in batch.items():
                if value is not None:
                    fields[name].append(value[:k])
            if k == batch["labels"].shape[0]:
                self._pending.pop(0)
            else:
                self._pending[0] = {name: None if v is None else v[k:] for name, v in batch.items()}
            need -= k
        self._pending_count -= n
        captions = [c for part in fields.pop("captions") for c in part]
        out = {name: torch.cat(parts) for name, parts in fields.items() if parts}
        out["captions"] = captions
        return out

    def _write(self, items: dict[str, Any]) -> None:
        encoded = [c.encode("utf-8") for c in items.pop("captions")]
        lengths = torch.tensor([0] + [len(b) for b in encoded], dtype=torch.long)
        tensors = {name: t.contiguous() for name, t in items.items()}
        tensors["labels"] = tensors["labels"].to(torch.long)
        joined = b"".join(encoded)
        tensors["caption_bytes"] = (torch.frombuffer(bytearray(joined), dtype=torch.uint8)
                                    if joined else torch.zeros(0, dtype=torch.uint8))
        tensors["caption_offsets"] = lengths.cumsum(0)
        index = len(self.shards)
        data = safetensors_bytes(tensors, metadata={"key_digest": self.key_digest,
                                                    "index": str(index)})
        with atomic_write(self.directory / shard_name(index)) as f:
            f.write(data)
        self.shards.append(ShardInfo(file=shard_name(index), count=int(lengths.numel() - 1),
                                     bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))


def read_caption(shard: Mapping[str, np.ndarray], row: int) -> str:
    """Caption ``row`` of a shard given as numpy views of its tensors."""
    offsets = shard["caption_offsets"]
    return shard["caption_bytes"][offsets[row]:offsets[row + 1]].tobytes().decode("utf-8")
