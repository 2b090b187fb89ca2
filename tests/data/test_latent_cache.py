"""Latent cache: keyed file names, reuse without encoding, rebuilds of anything untrusted."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from ldm_lightning.data.latent_cache import CacheKey, LatentCache, build_latent_cache, cache_path
from ldm_lightning.data.latent_dataset import LatentDataset
from ldm_lightning.utils.hashing import file_sha256, state_dict_sha256

N = 20


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
    return build_latent_cache(encode, dataset or TinyImages(), tmp_path, k or key(),
                              batch_size=6, progress=False, **kwargs)


def test_cache_equals_direct_encoding_and_file_layout(tmp_path):
    enc = Counting(pool)
    k = key()
    cache = build(tmp_path, enc)
    images = TinyImages().images
    assert enc.calls == 4  # ceil(20 / 6) batches
    assert cache.path == tmp_path / f"tiny-train-{k.digest()[:16]}.pt"
    torch.testing.assert_close(cache.latents, pool(images), rtol=0, atol=0)
    assert cache.labels.tolist() == [i % 3 for i in range(N)]
    assert cache.captions == [f"image {i}" for i in range(N)]
    assert not cache.latents.is_inference()

    stored = torch.load(cache.path, weights_only=True)
    assert stored["format_version"] == 1
    assert stored["key"] == {"autoencoder_hash": "ae-1", "dataset": "tiny", "split": "train",
                             "transforms": {"image_size": 8}, "flip": False}
    assert stored["latents_flipped"] is None
    torch.testing.assert_close(stored["latents"], pool(images), rtol=0, atol=0)

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
    torch.testing.assert_close(second.latents, first.latents, rtol=0, atol=0)
    assert second.captions == first.captions


@pytest.mark.parametrize("change", [{"autoencoder_hash": "ae-2"},
                                    {"transforms": {"image_size": 16}},
                                    {"split": "val"}])
def test_changed_key_writes_new_file_and_leaves_old_untouched(tmp_path, change):
    old = build(tmp_path, Counting(pool)).path
    old_bytes, old_mtime = old.read_bytes(), old.stat().st_mtime_ns
    enc = Counting(lambda x: pool(x) + 1)
    new = build(tmp_path, enc, key(**change))
    assert enc.calls == 4
    assert new.path != old
    assert old.read_bytes() == old_bytes and old.stat().st_mtime_ns == old_mtime
    torch.testing.assert_close(new.latents, pool(TinyImages().images) + 1)


def test_truncated_file_warns_and_is_rebuilt(tmp_path, caplog):
    path = build(tmp_path, Counting(pool)).path
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    enc = Counting(pool)
    with caplog.at_level(logging.WARNING):
        cache = build(tmp_path, enc)
    assert "corrupt or truncated" in caplog.text
    assert enc.calls == 4
    torch.testing.assert_close(cache.latents, pool(TinyImages().images), rtol=0, atol=0)
    assert LatentCache.load(path, key()) is not None


def test_file_with_other_key_inside_is_rebuilt(tmp_path, caplog):
    other = build(tmp_path, Counting(lambda x: -pool(x)), key(autoencoder_hash="ae-2")).path
    target = cache_path(tmp_path, key())
    target.write_bytes(other.read_bytes())
    enc = Counting(pool)
    with caplog.at_level(logging.WARNING):
        cache = build(tmp_path, enc)
    assert "differs from the expected key in ['autoencoder_hash']" in caplog.text
    assert enc.calls == 4
    torch.testing.assert_close(cache.latents, pool(TinyImages().images), rtol=0, atol=0)


def test_altered_tensor_fails_checksum_and_is_rebuilt(tmp_path, caplog):
    path = build(tmp_path, Counting(pool)).path
    data = torch.load(path, weights_only=True)
    data["latents"][0, 0, 0, 0] += 1.0
    torch.save(data, path)
    enc = Counting(pool)
    with caplog.at_level(logging.WARNING):
        build(tmp_path, enc)
    assert "checksum mismatch" in caplog.text
    assert enc.calls == 4


def test_dataset_of_other_length_is_rebuilt(tmp_path, caplog):
    build(tmp_path, Counting(pool))
    enc = Counting(pool)
    with caplog.at_level(logging.WARNING):
        cache = build(tmp_path, enc, dataset=TinyImages(n=12))
    assert "holds 20 latents but the dataset has 12 items" in caplog.text
    assert len(cache) == 12 and enc.calls == 2


def test_leftover_tmp_from_killed_run_is_not_read(tmp_path):
    valid = build(tmp_path / "elsewhere", Counting(pool)).path
    final = cache_path(tmp_path, key())
    leftover = final.with_name(f"{final.name}.tmp-999999")
    leftover.write_bytes(valid.read_bytes())  # even a complete tmp file is not the cache
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
    assert list(tmp_path.iterdir()) == []


def test_flipped_latents_are_encodings_of_flipped_images(tmp_path):
    enc = strided_conv()
    cache = build(tmp_path, enc, key(flip=True))
    images = TinyImages().images
    assert enc.calls == 8  # originals and mirrors, 4 batches each
    torch.testing.assert_close(cache.latents, enc.fn(images))
    torch.testing.assert_close(cache.latents_flipped, enc.fn(images.flip(-1)))
    # The reason both are stored: mirroring the latent is not the latent of the mirror.
    assert (cache.latents_flipped - cache.latents.flip(-1)).abs().max() > 0.1
    both = torch.cat([cache.latents, cache.latents_flipped]).double()
    torch.testing.assert_close(cache.mean, both.mean(dim=(0, 2, 3)).float())


def test_latent_dataset_random_flip_draws_both_versions(tmp_path):
    cache = build(tmp_path, strided_conv(), key(flip=True))
    ds = LatentDataset(cache, random_flip=True, generator=torch.Generator().manual_seed(0))
    picks = []
    for _ in range(200):
        item = ds[3]
        assert item["label"] == 0 and item["caption"] == "image 3"
        if torch.equal(item["latent"], cache.latents[3]):
            picks.append(0)
        else:
            torch.testing.assert_close(item["latent"], cache.latents_flipped[3], rtol=0, atol=0)
            picks.append(1)
    assert 70 < sum(picks) < 130  # Binomial(200, 1/2): mean 100, std ~7
    plain = LatentDataset(cache)
    assert len(plain) == N
    assert all(torch.equal(plain[i]["latent"], cache.latents[i]) for i in range(N))


def test_float16_storage(tmp_path):
    cache = build(tmp_path, Counting(pool), dtype=torch.float16)
    assert cache.latents.dtype == torch.float16
    reloaded = LatentCache.load(cache.path, key())
    assert reloaded.latents.dtype == torch.float16
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
