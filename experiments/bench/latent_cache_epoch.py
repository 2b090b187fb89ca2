"""Benchmark: one diffusion-training epoch encoding on the fly vs reading the latent cache.

Both epochs shuffle, flip at random (the image before encoding, or the cached mirror
latent) and run the same UNet-free step on the latents, ``z_t = sqrt(abar_t) z +
sqrt(1 - abar_t) eps`` and an MSE (DDPM eq. 4), so the difference is the encoder's cost. The
one-off build of the cache (encoding each image and its mirror once) is timed apart.

    .venv/bin/python experiments/bench/latent_cache_epoch.py --n 512
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ldm_lightning.data.latent_cache import CacheKey, build_latent_cache
from ldm_lightning.data.latent_dataset import LatentDataset
from ldm_lightning.nn.encoder_decoder import Encoder
from ldm_lightning.nn.quantizer import VectorQuantizer
from ldm_lightning.utils.hashing import state_dict_sha256


class SyntheticImages(Dataset):
    """``n`` random images ``[3, size, size]`` in [-1, 1], made once, indexed cheaply."""

    def __init__(self, n: int, size: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, size, size, generator=g) * 2 - 1
        self.labels = torch.randint(10, (n,), generator=g).tolist()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": self.labels[i], "caption": f"image {i}"}


class VQEncoder(nn.Module):
    """Encoder -> 1x1 quant_conv -> nearest codebook entry: the code a VQ autoencoder caches."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.encoder = Encoder(ch=args.ch, ch_mult=args.ch_mult, num_res_blocks=args.res_blocks,
                               attn_resolutions=(), in_channels=3, resolution=args.image_size,
                               z_channels=args.z_channels, double_z=False)
        self.quant_conv = nn.Conv2d(args.z_channels, args.z_channels, 1)
        self.quantize = VectorQuantizer(args.n_embed, args.z_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.quantize(self.quant_conv(self.encoder(x)))[0]


def train_step(z: Tensor, abar: Tensor) -> float:
    """DDPM forward noising of a latent batch and an MSE read-out, standing in for the UNet."""
    t = torch.randint(len(abar), (z.shape[0],), device=z.device)
    a = abar[t].view(-1, 1, 1, 1)
    eps = torch.randn_like(z)
    z_t = a.sqrt() * z + (1 - a).sqrt() * eps
    return float((z_t - eps).square().mean())


def timed_epoch(batches: Iterable, to_latents: Callable[[dict], Tensor], abar: Tensor,
                device: torch.device) -> float:
    start = time.perf_counter()
    for batch in batches:
        train_step(to_latents(batch), abar)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=512, help="images in the synthetic dataset")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--ch", type=int, default=64)
    parser.add_argument("--ch-mult", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--res-blocks", type=int, default=2)
    parser.add_argument("--z-channels", type=int, default=4)
    parser.add_argument("--n-embed", type=int, default=256)
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--cache-dir", default=None, help="default: a temporary directory")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)

    model = VQEncoder(args).to(device).eval()
    dataset = SyntheticImages(args.n, args.image_size)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, device=device), 0)
    key = CacheKey(autoencoder_hash=state_dict_sha256(model), dataset="synthetic", split="train",
                   transforms={"image_size": args.image_size, "n": args.n}, flip=True)

    def encode_on_the_fly(batch: dict) -> Tensor:
        images = batch["image"].to(device)
        mirror = torch.rand(images.shape[0], device=device) < 0.5
        images = torch.where(mirror.view(-1, 1, 1, 1), images.flip(-1), images)
        with torch.inference_mode():
            return model(images)

    fly_s = timed_epoch(DataLoader(dataset, batch_size=args.batch_size, shuffle=True),
                        encode_on_the_fly, abar, device)
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = args.cache_dir or tmp
        start = time.perf_counter()
        cache = build_latent_cache(model, dataset, cache_dir, key, batch_size=args.batch_size,
                                   device=device, dtype=getattr(torch, args.dtype),
                                   progress=False)
        build_s = time.perf_counter() - start
        file_mb = sum(shard.bytes for shard in cache.manifest.shards) / 2**20
        start = time.perf_counter()
        build_latent_cache(model, dataset, cache_dir, key, progress=False)
        reload_s = time.perf_counter() - start
        # The shards are read from disk on demand: the epoch runs while they exist.
        cached = DataLoader(LatentDataset(cache, random_flip=True), batch_size=args.batch_size,
                            shuffle=True)
        cache_s = timed_epoch(cached, lambda b: b["latent"].to(device), abar, device)
        latents, flipped = cache.read("latents"), cache.read("latents_flipped")
    differ = (flipped != latents.flip(-1)).any(dim=1).float().mean().item()

    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"device {device} ({platform.processor() or platform.machine()}, "
          f"{args.threads} threads), torch {torch.__version__}")
    print(f"encoder: ch={args.ch} ch_mult={args.ch_mult} res_blocks={args.res_blocks}, "
          f"{params:.2f} M params, VQ codebook {args.n_embed}x{args.z_channels}; "
          f"{args.n} images {args.image_size}px -> latents {tuple(latents.shape[1:])} "
          f"{args.dtype}, batch {args.batch_size}")
    print()
    print("| measure | seconds |")
    print("| --- | ---: |")
    print(f"| one-off cache build ({2 * args.n} encodings, {file_mb:.1f} MiB file) "
          f"| {build_s:.3f} |")
    print(f"| load of the existing cache (no encoding) | {reload_s:.3f} |")
    print(f"| epoch, encoding on the fly | {fly_s:.3f} |")
    print(f"| epoch, from the cache | {cache_s:.3f} |")
    print(f"| speed-up of an epoch (on the fly / cache) | {fly_s / cache_s:.1f}x |")
    print(f"| epochs until the build pays off | {build_s / max(fly_s - cache_s, 1e-9):.2f} |")
    print()
    print(f"latent positions where E(flip x) != flip(E x): {100 * differ:.1f}% "
          "(random-init encoder; why the cache stores encoded mirrors)")


if __name__ == "__main__":
    main()
