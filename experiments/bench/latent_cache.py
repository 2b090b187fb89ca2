"""Memory and epoch time of the latent cache: one ``.pt`` loaded whole vs mmap'd safetensors shards.

Writes a synthetic cache of ``--n`` latents 4x32x32 float32 (labels and captions too, no flips)
in three forms and reads one shuffled epoch (batch 256) from each, every measurement in a
fresh process: with 0 and 2 DataLoader workers, and under 2-process DDP (gloo, CPU, a linear
model wrapped in DistributedDataParallel, DistributedSampler, 0 workers)::

    python experiments/bench/latent_cache.py --n 200000 --dir /tmp/latent_cache_bench

Formats: ``pt`` is the single file of earlier versions as they read it (``torch.load`` whole,
then the sha256 of the tensors); ``pt-mmap`` the same file through ``torch.load(mmap=True)``
(the cheapest alternative: no sharding); ``shards`` the current cache
(:func:`~ldm_lightning.data.latent_cache.build_latent_cache`, sha256 of every shard on rank 0).

Memory per process, from ``/proc/<pid>/status`` and ``smaps_rollup``: peak RSS (``VmHWM``),
and at the end of the epoch the anonymous RSS (private memory the process owns; the kernel
cannot drop it) and the PSS (resident pages divided by the number of processes sharing them).
RSS counts a page of a mapped file in every process that touched it, so for mmap'd caches the
RSS grows to the size of the file read while the memory used once per node is the page
cache; PSS and anonymous RSS show what each process really adds. Workers are measured just
before their last batch. Timings include opening the cache and starting the workers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ldm_lightning.data.latent_cache import CacheKey, LatentCache, build_latent_cache, cache_path
from ldm_lightning.data.latent_dataset import LatentDataset
from ldm_lightning.utils.hashing import tensors_sha256

SHAPE = (4, 32, 32)
BATCH = 256
FORMATS = ("pt", "pt-mmap", "shards")
RESULTS = Path(__file__).resolve().parents[1] / "results" / "latent_cache"


class SyntheticLatents(Dataset):
    """Item ``i``: a standard normal latent ``[4, 32, 32]`` seeded by ``i``, label ``i % 1000``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(i))
        return {"image": z, "label": i % 1000, "caption": f"class {i % 1000}"}


class SingleFile(Dataset):
    """The single-file cache as earlier versions read it: every tensor in memory (or mmap'd)."""

    def __init__(self, path: Path, mmap: bool) -> None:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        if tensors_sha256((data["latents"], None, data["labels"]),
                          json.dumps(data["captions"])) != data["sha256"]:
            raise RuntimeError(f"{path}: checksum mismatch")
        self.latents, self.captions = data["latents"], data["captions"]
        self.labels = data["labels"].tolist()

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"latent": self.latents[i].float(), "label": self.labels[i],
                "caption": self.captions[i]}


def key(n: int) -> CacheKey:
    return CacheKey(autoencoder_hash="identity", dataset="synthetic", split="train",
                    transforms={"n": n})


def prepare(directory: Path, n: int) -> None:
    """Write the shards (through the real build path, identity encoder) and the single file."""
    start = time.perf_counter()
    cache = build_latent_cache(lambda z: z, SyntheticLatents(n), directory, key(n),
                               batch_size=4096, progress=False)
    print(f"shards: {len(cache.manifest.shards)} written or verified in "
          f"{time.perf_counter() - start:.1f} s")
    single = directory / "single.pt"
    if not single.is_file():
        latents, labels, captions = cache.read("latents"), cache.read("labels"), cache.captions()
        torch.save({"latents": latents, "labels": labels, "captions": captions,
                    "sha256": tensors_sha256((latents, None, labels), json.dumps(captions))},
                   single)


def open_dataset(fmt: str, directory: Path, n: int, rank: int = 0) -> Dataset:
    if fmt == "shards":
        cache = LatentCache.load(cache_path(directory, key(n)), key(n), n, checksum=rank == 0)
        if cache is None:
            raise RuntimeError("no valid shards; run without --measure first")
        return LatentDataset(cache)
    return SingleFile(directory / "single.pt", mmap=fmt == "pt-mmap")


def memory(pid: int | str = "self") -> dict[str, float]:
    """Peak RSS, anonymous RSS and PSS of a process, MiB (Linux /proc)."""
    status = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    rollup = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    kib = {name: int(value.split()[0]) for name, value in {**status, **rollup}.items()
           if value.strip().endswith("kB")}
    return {"peak_rss": kib["VmHWM"] / 1024, "anon": kib["RssAnon"] / 1024,
            "pss": kib["Pss"] / 1024}


def children() -> list[int]:
    pid = os.getpid()
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]


def epoch(loader: DataLoader, step) -> tuple[float, list[dict[str, float]]]:
    """Seconds for one pass over ``loader`` calling ``step(batch)``; worker memory at the end."""
    start, workers = time.perf_counter(), []
    for i, batch in enumerate(loader):
        if i == len(loader) - 1 and loader.num_workers:
            workers = [memory(pid) for pid in children()]
        step(batch["latent"])
    return time.perf_counter() - start, workers


def measure_single(fmt: str, directory: Path, n: int, workers: int) -> list[dict[str, Any]]:
    start = time.perf_counter()
    dataset = open_dataset(fmt, directory, n)
    load_s = time.perf_counter() - start
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    epoch_s, worker_mem = epoch(loader, lambda z: z.sum())
    rows = [{"process": "main", "load_s": load_s, "epoch_s": epoch_s, **memory()}]
    rows += [{"process": f"worker {i}", **mem} for i, mem in enumerate(worker_mem)]
    return rows


def ddp_rank(rank: int, fmt: str, directory: Path, n: int, port: int, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    start = time.perf_counter()
    dataset = open_dataset(fmt, directory, n, rank)
    load_s = time.perf_counter() - start
    dist.barrier()
    sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler)
    model = nn.parallel.DistributedDataParallel(nn.Linear(SHAPE[0] * SHAPE[1] * SHAPE[2], 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step(z: Tensor) -> None:
        optimizer.zero_grad()
        model(z.flatten(1)).square().mean().backward()
        optimizer.step()

    epoch_s, _ = epoch(loader, step)
    row = {"process": f"rank {rank}", "load_s": load_s, "epoch_s": epoch_s, **memory()}
    (out / f"rank{rank}.json").write_text(json.dumps(row))
    dist.destroy_process_group()


def measure_ddp(fmt: str, directory: Path, n: int) -> list[dict[str, Any]]:
    out = directory / f"ddp-{fmt}"
    out.mkdir(exist_ok=True)
    torch.multiprocessing.spawn(ddp_rank, args=(fmt, directory, n, 29500 + os.getpid() % 1000,
                                                out), nprocs=2)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (format, setting) in a fresh interpreter, so peak RSS is that measurement's."""
    rows = []
    for fmt in FORMATS:
        for setting in ("0 workers", "2 workers", "DDP x2"):
            command = [sys.executable, __file__, "--n", str(args.n), "--dir", str(args.dir),
                       "--measure", fmt, setting]
            result = subprocess.run(command, check=True, capture_output=True, text=True)
            for row in json.loads(result.stdout.strip().splitlines()[-1]):
                rows.append({"format": fmt, "setting": setting, **row})
                print(rows[-1], flush=True)
    return rows


def table(rows: list[dict[str, Any]], n: int) -> str:
    def num(row: dict[str, Any], name: str, fmt: str) -> str:
        return format(row[name], fmt) if name in row else ""

    lines = [f"{n} latents {'x'.join(map(str, SHAPE))} float32 "
             f"({n * 4 * SHAPE[0] * SHAPE[1] * SHAPE[2] / 2**30:.2f} GiB), batch {BATCH}, "
             f"shuffled; {os.cpu_count()} CPUs, torch {torch.__version__}", "",
             "| format | setting | process | open s | epoch s | peak RSS MiB | anon RSS MiB "
             "| PSS MiB |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['format']} | {row['setting']} | {row['process']} | "
                     f"{num(row, 'load_s', '.1f')} | {num(row, 'epoch_s', '.1f')} | "
                     f"{row['peak_rss']:.0f} | {row['anon']:.0f} | {row['pss']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/latent_cache_bench"))
    parser.add_argument("--measure", nargs=2, metavar=("FORMAT", "SETTING"),
                        help="internal: one measurement in this process, as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.measure:
        fmt, setting = args.measure
        rows = (measure_ddp(fmt, args.dir, args.n) if setting == "DDP x2" else
                measure_single(fmt, args.dir, args.n, int(setting.split()[0])))
        print(json.dumps(rows))
        return
    prepare(args.dir, args.n)
    text = table(run_all(args), args.n)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
