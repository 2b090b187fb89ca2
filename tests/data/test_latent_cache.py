"""Latent cache: keyed names, sharded memory-mapped storage, reuse without encoding, rebuilds
of anything untrusted (truncated, altered or foreign shards, no manifest, interrupted builds)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import DataLoader

from ldm_lightning.data.latent_cache import CacheKey, LatentCache, build_latent_cache, cache_path
from ldm_lightning.data.latent_dataset import LatentDataset
from ldm_lightning.data.latent_shards import MANIFEST
from ldm_lightning.utils.hashing import file_sha256, state_dict_sha256

N = 20
SHARD = 8  # 20 latents -> shards of 8, 8 and 4


class TinyImages(torch.utils.data.Dataset):
    """20 random 8x8 images in [-1, 1] with labels, captions and a key the cache ignores."""

    def __init__(self, n: int = N) -> None:
        g = torch.Generator().manual_seed(1)
        self.images = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": i % 3, "caption": f"image {i}",
                "meta": object()}


class Counting:
    """Wraps an encoder and counts how many batches it was called on."""

    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.fn(x)


def pool(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, 2)


def strided_conv() -> Counting:
    """Stride-2 conv with a random kernel: samples columns 0, 2, 4, 6, so not flip-equivariant."""
    weight = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(2))
    return Counting(lambda x: F.conv2d(x, weight, stride=2, padding=1))


def key(**overrides) -> CacheKey:
    fields = {"autoencoder_hash": "ae-1", "dataset": "tiny", "split": "train",
              "transforms": {"image_size": 8}, "flip": False}
    fields.update(overrides)
    return CacheKey(**fields)


def build(tmp_path: Path, encode, k: CacheKey | None = None, dataset=None, **kwargs):
    kwargs.setdefault("shard_size", SHARD)
    return build_latent_cache(encode, dataset or TinyImages(), tmp_path, k or key(),
                              batch_size=6, progress=False, **kwargs)


def shards(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("shard-*.safetensors"))


def test_cache_equals_direct_encoding_and_file_layout(tmp_path):
    enc = Counting(pool)
    k = key()
    cache = build(tmp_path, enc)
    images = TinyImages().images
    assert enc.calls == 4  # ceil(20 / 6) batches
    assert cache.path == tmp_path / f"tiny-train-{k.digest()[:16]}"
    assert [p.name for p in shards(cache.path)] == [f"shard-0000{i}.safetensors" for i in range(3)]
    torch.testing.assert_close(cache.read("latents"), pool(images), rtol=0, atol=0)
    assert cache.read("labels").tolist() == [i % 3 for i in range(N)]
    assert cache.captions() == [f"image {i}" for i in range(N)]
    latents, labels, captions = cache.items([19, 0, 8, 7, -1, 9])  # across the three shards
    torch.testing.assert_close(latents, pool(images[[19, 0, 8, 7, 19, 9]]), rtol=0, atol=0)
    assert labels == [i % 3 for i in (19, 0, 8, 7, 19, 9)]
    assert captions == [f"image {i}" for i in (19, 0, 8, 7, 19, 9)]
    with pytest.raises(IndexError, match="out of range for a cache of 20"):
        cache.items([20])

    manifest = json.loads((cache.path / MANIFEST).read_text())
    assert manifest["format_version"] == 2 and manifest["count"] == N
    assert manifest["key"] == {"autoencoder_hash": "ae-1", "dataset": "tiny", "split": "train",
                               "transforms": {"image_size": 8}, "flip": False}
    assert [s["count"] for s in manifest["shards"]] == [8, 8, 4]
    for entry, path in zip(manifest["shards"], shards(cache.path), strict=True):
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    second = load_file(shards(cache.path)[1])
    assert set(second) == {"latents", "labels", "caption_bytes", "caption_offsets"}
    torch.testing.assert_close(second["latents"], pool(images[8:16]), rtol=0, atol=0)

    z = pool(images).double()
    torch.testing.assert_close(cache.mean, z.mean(dim=(0, 2, 3)).float())
    torch.testing.assert_close(cache.std, z.std(dim=(0, 2, 3), correction=0).float())
    assert cache.scale_factor == pytest.approx(1 / z.std(correction=0).item(), rel=1e-5)


def test_digest_is_sha256_of_canonical_json_and_ignores_dict_order():
    k = key(transforms={"b": 2, "a": [1, 2]})
    canonical = ('{"autoencoder_hash":"ae-1","dataset":"tiny","flip":false,"split":"train",'
                 '"transforms":{"a":[1,2],"b":2}}')
    assert k.digest() == hashlib.sha256(canonical.encode()).hexdigest()
    assert key(transforms={"a": (1, 2), "b": 2}).digest() == k.digest()
    assert key(flip=True).digest() != key().digest()


def test_second_build_reuses_file_without_encoding(tmp_path):
    first = build(tmp_path, Counting(pool))
    enc = Counting(pool)
    second = build(tmp_path, enc)
    assert enc.calls == 0
    torch.testing.assert_close(second.read("latents"), first.read("latents"), rtol=0, atol=0)
    assert second.captions() == first.captions()


@pytest.mark.parametrize("change", [{"autoencoder_hash": "ae-2"},
                                    {"transforms": {"image_size": 16}},
                                    {"split": "val"}])
def test_changed_key_writes_new_file_and_leaves_old_untouched(tmp_path, change):
    old = build(tmp_path, Counting(pool)).path
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in old.iterdir()}
    enc = Counting(lambda x: pool(x) + 1)
    new = build(tmp_path, enc, key(**change))
    assert enc.calls == 4
    assert new.path != old
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in old.iterdir()} == before
    torch.testing.assert_close(new.read("latents"), pool(TinyImages().images) + 1)


def rebuilt(tmp_path: Path, caplog, message: str, **kwargs) -> LatentCache:
    """Build again, expecting ``message`` logged and a full re-encode equal to the pooling."""
    enc = Counting(pool)
    with caplog.at_level(logging.INFO):
        cache = build(tmp_path, enc, **kwargs)
    assert message in caplog.text
    dataset = kwargs.get("dataset", TinyImages())
    assert enc.calls == -(-len(dataset) // 6)
    torch.testing.assert_close(cache.read("latents"), pool(dataset.images), rtol=0, atol=0)
    return cache


def test_truncated_shard_is_rebuilt(tmp_path, caplog):
    path = shards(build(tmp_path, Counting(pool)).path)[1]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    rebuilt(tmp_path, caplog, "shard-00001.safetensors has")
    assert LatentCache.load(path.parent, key()) is not None


def test_altered_shard_fails_checksum_and_is_rebuilt(tmp_path, caplog):
    path = shards(build(tmp_path, Counting(pool)).path)[2]
    tensors = load_file(path)
    tensors["latents"][0, 0, 0, 0] += 1.0
    save_file(tensors, path, metadata={"key_digest": key().digest(), "index": "2"})
    rebuilt(tmp_path, caplog, "shard-00002.safetensors: checksum mismatch")


def test_missing_manifest_is_no_cache(tmp_path, caplog):
    (build(tmp_path, Counting(pool)).path / MANIFEST).unlink()
    rebuilt(tmp_path, caplog, f"no complete latent cache at {cache_path(tmp_path, key())}")


def test_cache_with_other_key_inside_is_rebuilt(tmp_path, caplog):
    other = build(tmp_path, Counting(lambda x: -pool(x)), key(autoencoder_hash="ae-2")).path
    target = cache_path(tmp_path, key())
    target.mkdir()
    for path in other.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    rebuilt(tmp_path, caplog, "differs from the expected key in ['autoencoder_hash']")


def test_foreign_shard_with_matching_manifest_entry_is_rebuilt(tmp_path, caplog):
    """A shard of another cache, even with the manifest's size and sha256 made to match."""
    other = shards(build(tmp_path, Counting(lambda x: -pool(x)), key(split="val")).path)[0]
    target = build(tmp_path, Counting(pool)).path
    (target / other.name).write_bytes(other.read_bytes())
    manifest = json.loads((target / MANIFEST).read_text())
    manifest["shards"][0].update(bytes=other.stat().st_size,
                                 sha256=hashlib.sha256(other.read_bytes()).hexdigest())
    (target / MANIFEST).write_text(json.dumps(manifest))
    rebuilt(tmp_path, caplog, "shard-00000.safetensors belongs to another cache")


def test_dataset_of_other_length_is_rebuilt(tmp_path, caplog):
    build(tmp_path, Counting(pool))
    cache = rebuilt(tmp_path, caplog, "holds 20 latents but the dataset has 12 items",
                    dataset=TinyImages(n=12))
    assert len(cache) == 12 and len(shards(cache.path)) == 2  # the third shard was removed


def test_old_single_file_cache_is_rebuilt_as_shards_and_left_in_place(tmp_path, caplog):
    legacy = tmp_path / f"{key().dirname()}.pt"
    torch.save({"format_version": 1, "latents": torch.zeros(N, 3, 4, 4)}, legacy)
    rebuilt(tmp_path, caplog, f"latent cache {legacy} is in the single-file format")
    assert legacy.is_file()


def test_leftover_tmp_from_killed_run_is_not_read(tmp_path):
    valid = build(tmp_path / "elsewhere", Counting(pool)).path
    final = cache_path(tmp_path, key())
    final.mkdir()
    leftover = final / f".{MANIFEST}.tmp-999999"
    leftover.write_bytes((valid / MANIFEST).read_bytes())  # even a complete tmp file is not it
    for path in shards(valid):
        (final / path.name).write_bytes(path.read_bytes())
    assert LatentCache.load(final, key()) is None
    enc = Counting(pool)
    build(tmp_path, enc)
    assert enc.calls == 4
    assert leftover.exists()


def test_write_interrupted_before_rename_leaves_no_cache(tmp_path, monkeypatch):
    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path, Counting(pool))
    assert [list(d.iterdir()) for d in tmp_path.iterdir()] == [[]]


def test_build_killed_between_shards_leaves_no_complete_looking_cache(tmp_path, caplog):
    """A crash after some shards are written, over a valid cache of other length: the old
    manifest is gone before the first new shard, and no new manifest was written."""
    build(tmp_path, Counting(pool), dataset=TinyImages(n=12))

    def dies_on_third_batch(x: Tensor) -> Tensor:
        if dies_on_third_batch.calls == 2:
            raise KeyboardInterrupt
        dies_on_third_batch.calls += 1
        return pool(x)

    dies_on_third_batch.calls = 0
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path, dies_on_third_batch)
    path = cache_path(tmp_path, key())
    # The new first shard (batches 1-2 filled it) and the old second one; no manifest.
    assert sorted(p.name for p in path.iterdir()) == [f"shard-0000{i}.safetensors" for i in (0, 1)]
    assert LatentCache.load(path, key()) is None
    assert LatentCache.load(path, key(), expected_length=12) is None
    rebuilt(tmp_path, caplog, "no complete latent cache")


def test_dataset_reads_through_two_workers_and_pickles_small(tmp_path):
    images = torch.rand(2000, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    dataset = TinyImages()
    dataset.images = images
    cache = build(tmp_path, Counting(pool), dataset=dataset, shard_size=300)
    latents = LatentDataset(cache)
    assert latents[0]["latent"].dtype == torch.float32
    assert len(pickle.dumps(latents)) < 4096 < pool(images).numel() * 4  # 384 KB of latents
    loader = DataLoader(latents, batch_size=64, num_workers=2, shuffle=False)
    batches = list(loader)
    torch.testing.assert_close(torch.cat([b["latent"] for b in batches]), pool(images),
                               rtol=0, atol=0)
    assert torch.cat([b["label"] for b in batches]).tolist() == [i % 3 for i in range(2000)]
    assert [c for b in batches for c in b["caption"]][1999] == "image 1999"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_shard_tensors_are_views_of_the_mapped_file(tmp_path):
    cache = build(tmp_path, Counting(pool))
    latents = cache.shard(1)["latents"]
    path = str(shards(cache.path)[1])
    maps = Path("/proc/self/maps").read_text().splitlines()
    mapped = [line.split()[0].split("-") for line in maps if line.endswith(path)]
    assert any(int(lo, 16) <= latents.data_ptr() < int(hi, 16) for lo, hi in mapped)
    item = LatentDataset(cache)[8]["latent"]  # row 0 of shard 1, copied out of the map
    assert item.data_ptr() != latents.data_ptr()
    torch.testing.assert_close(item, latents[0], rtol=0, atol=0)


def test_flipped_latents_are_encodings_of_flipped_images(tmp_path):
    enc = strided_conv()
    cache = build(tmp_path, enc, key(flip=True))
    images = TinyImages().images
    assert enc.calls == 8  # originals and mirrors, 4 batches each
    latents, flipped = cache.read("latents"), cache.read("latents_flipped")
    mixed = cache.items([0, 1, 9, 19], flipped=[True, False, True, False])[0]
    torch.testing.assert_close(mixed, torch.stack([flipped[0], latents[1], flipped[9],
                                                   latents[19]]), rtol=0, atol=0)
    torch.testing.assert_close(latents, enc.fn(images))
    torch.testing.assert_close(flipped, enc.fn(images.flip(-1)))
    # The reason both are stored: mirroring the latent is not the latent of the mirror.
    assert (flipped - latents.flip(-1)).abs().max() > 0.1
    both = torch.cat([latents, flipped]).double()
    torch.testing.assert_close(cache.mean, both.mean(dim=(0, 2, 3)).float())


def test_latent_dataset_random_flip_draws_both_versions(tmp_path):
    cache = build(tmp_path, strided_conv(), key(flip=True))
    ds = LatentDataset(cache, random_flip=True, generator=torch.Generator().manual_seed(0))
    latents, flipped = cache.read("latents"), cache.read("latents_flipped")
    picks = []
    for _ in range(200):
        item = ds[3]
        assert item["label"] == 0 and item["caption"] == "image 3"
        if torch.equal(item["latent"], latents[3]):
            picks.append(0)
        else:
            torch.testing.assert_close(item["latent"], flipped[3], rtol=0, atol=0)
            picks.append(1)
    assert 70 < sum(picks) < 130  # Binomial(200, 1/2): mean 100, std ~7
    plain = LatentDataset(cache)
    assert len(plain) == N
    assert all(torch.equal(plain[i]["latent"], latents[i]) for i in range(N))


def test_float16_storage(tmp_path):
    cache = build(tmp_path, Counting(pool), dtype=torch.float16)
    assert cache.read("latents").dtype == torch.float16
    reloaded = LatentCache.load(cache.path, key())
    assert reloaded.read("latents").dtype == torch.float16
    item = LatentDataset(reloaded)[5]["latent"]
    assert item.dtype == torch.float32
    torch.testing.assert_close(item, pool(TinyImages().images[5]), atol=1e-3, rtol=1e-3)


def test_other_ranks_load_only(tmp_path):
    with pytest.raises(RuntimeError, match="rank 1: no valid latent cache.*barrier"):
        build(tmp_path, Counting(pool), rank=1, world_size=2)
    build(tmp_path, Counting(pool), rank=0, world_size=2)
    enc = Counting(pool)
    cache = build(tmp_path, enc, rank=1, world_size=2)
    assert enc.calls == 0 and len(cache) == N
    with pytest.raises(ValueError, match="rank < world_size"):
        build(tmp_path, enc, rank=2, world_size=2)


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="return the posterior mode"):
        build(tmp_path, lambda x: (pool(x), None))

    class NoCaption(TinyImages):
        def __getitem__(self, i):
            return {"image": self.images[i], "label": 0}

    with pytest.raises(ValueError, match="missing 'caption'"):
        build(tmp_path, pool, dataset=NoCaption())
    with pytest.raises(ValueError, match="JSON-serialisable"):
        key(transforms={"mean": torch.zeros(3)})
    with pytest.raises(ValueError, match="path separator"):
        key(dataset="a/b")
    with pytest.raises(ValueError, match="rebuild with CacheKey"):
        LatentDataset(build(tmp_path, pool), random_flip=True)


def test_hashes_of_checkpoint_file_and_state_dict(tmp_path):
    conv = torch.nn.Conv2d(3, 4, 3)
    ckpt = tmp_path / "ae.ckpt"
    torch.save(conv.state_dict(), ckpt)
    assert file_sha256(ckpt, chunk_bytes=7) == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    before = state_dict_sha256(conv)
    assert state_dict_sha256(conv.state_dict()) == before
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] += 1e-3
    assert state_dict_sha256(conv) != before
    assert json.loads(key(autoencoder_hash=before).canonical_json())["autoencoder_hash"] == before
