"""GPU speed of issue 17 in one call: matmul peak, LDM-4 raw step, Lightning loop, shapes runs.

Rows, each a ratio against its peer measured in the same run:

1. the bf16 matmul peak: one large bf16 matrix product (8192^3), TFLOP/s: the ceiling of "% of
   peak";
2. the celebahq-ldm-vq-4 UNet raw training step (gpu_step.py; batch 48, 3x64x64, bf16 autocast):
   diffusers' UNet2DModel of the same configuration (when importable; the peer), ours eager with
   torch's default AdamW (foreach), + fused AdamW, + regional torch.compile; images/s, counted
   TFLOP/s and % of peak, host synchronisations per step and the attention kernels that ran;
   then one EMA update of its weights, Lightning's per-tensor EMAWeightAveraging (the peer)
   against callbacks.ema.ForeachEMA (ema_update.py): ms, ops dispatched, host syncs;
3. the same UNet trained through ``python -m ldm_lightning.train`` (gpu_loop.py; pixel space,
   identity first stage, shapes images at 64 px, EMA callback, bf16-mixed, 12 workers), eager
   and regional compile, each against its raw step;
4. the shapes experiments with ``trainer=gpu`` (shapes_kl; shapes_ldm in pixel space), as
   configured and with ``model.compile={mode: reduce-overhead}`` (CUDA graphs) and a larger
   batch, batches/s and images/s against the default.

Prints a markdown table and writes it to ``--out`` (experiments/results/gpu/table.md). A row
that fails says why in the table; the others still run. On a machine missing the packages the
project needs it prints the pip commands that bring them as wheels and stops.

    python experiments/bench/gpu.py                  # a GPU machine, about 6 minutes
    python experiments/bench/gpu.py --cpu-smoke      # the whole script, tiny, CPU, < 1 minute
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch
from ema_update import compare_updates
from gpu_loop import train_run
from gpu_step import bench_raw_steps, unet_shape
from unet_vs_diffusers import build_ours

RESULTS = Path(__file__).parents[1] / "results" / "gpu"
# What the project imports beyond torch, Lightning, torchmetrics and torchvision, as wheels
# (the versions of the development venv this was written in). antlr4 is an sdist only: `pip
# wheel` builds it.
WHEELS = {"hydra": "hydra-core==1.3.8", "omegaconf": "omegaconf==2.3.1", "lpips": "lpips==0.1.4",
          "torch_fidelity": "torch-fidelity==0.4.0", "diffusers": "diffusers==0.42.1",
          "importlib_metadata": "importlib_metadata==10.2.0"}
SDISTS = {"antlr4": "antlr4-python3-runtime==4.9.3"}
OPTIONAL = {"diffusers", "importlib_metadata"}  # the diffusers row only
START = time.perf_counter()


def log(*parts: object) -> None:
    print(f"[{time.perf_counter() - START:6.1f} s]", *parts, flush=True)


def check_installed() -> bool:
    """Print what is missing and the pip commands that bring it; False if a needed one is."""
    missing = [m for m in [*WHEELS, *SDISTS] if importlib.util.find_spec(m) is None]
    if not missing:
        return True
    wheels = " ".join(WHEELS[m] for m in missing if m in WHEELS)
    sdists = " ".join(SDISTS[m] for m in missing if m in SDISTS)
    print(f"missing: {', '.join(missing)}. On a machine with pip access, in the repo root:")
    if wheels:
        print("  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 "
              f"--implementation cp --platform manylinux2014_x86_64 -d .whl {wheels}")
    if sdists:
        print(f"  python3 -m pip wheel --no-deps -w .whl {sdists}")
    print("  then here: python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl"
          " && export PYTHONPATH=/tmp/site")
    return set(missing) <= OPTIONAL


def matmul_peak(device: torch.device, n: int) -> float:
    """TFLOP/s of an ``n x n x n`` bf16 matrix product on random data (mean of 10 after 3)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 10 * 2 * n**3 / (time.perf_counter() - start) / 1e12


def row(name: str, value: float | None, unit: str, peer: tuple[str, float] | None = None,
        tflops: float | None = None, peak: float | None = None, note: str = "") -> str:
    shown = "failed" if value is None else f"{value:.1f} {unit}"
    ratio = f"{value / peer[1]:.2f}× {peer[0]}" if value and peer and peer[1] else ""
    flop = f"{tflops:.1f}" if tflops else ""
    share = f"{tflops / peak:.1%}" if tflops and peak else ""
    return f"| {name} | {shown} | {ratio} | {flop} | {share} | {note} |"


def loop_runs(args: argparse.Namespace, work: Path) -> list[tuple[str, list[str], int]]:
    """``(name, overrides, steps)`` of the entry-point runs."""
    gpu = ["trainer=cpu"] if args.cpu_smoke else ["trainer=gpu"]
    workers = 0 if args.cpu_smoke else 12
    unet = (["model.unet.model_channels=32", "model.unet.channel_mult=[1,2]",
             "model.unet.num_res_blocks=1", "model.unet.attention_resolutions=[2]",
             "model.unet.num_head_channels=16", "data.image_size=16"]
            if args.cpu_smoke else ["data.image_size=64"])
    compile_ = "{regional:true,backend:aot_eager}" if args.cpu_smoke else "{regional:true}"
    graphs = "{backend:aot_eager}" if args.cpu_smoke else "{mode:reduce-overhead}"
    ldm4 = ["model=ldm", "data=shapes", f"data.batch_size={args.batch}",
            f"data.num_workers={workers}", "model.first_stage.identity=true",
            "model.scale_factor=1.0", "callbacks=ema", "logger=csv", *gpu, *unet]
    n, big = (4, 4) if args.cpu_smoke else (args.loop_steps, 256)
    tiny = ["data.batch_size=2"] if args.cpu_smoke else []
    shapes_ldm = ["+experiment=shapes_ldm", "model.first_stage.identity=true",
                  "data.cache_latents=false", f"data.num_workers={workers}", *gpu, *tiny]
    shapes_kl = ["+experiment=shapes_kl", f"data.num_workers={workers}", *gpu, *tiny]
    return [
        ("Lightning loop, LDM-4 UNet, eager", ldm4, n),
        ("Lightning loop, LDM-4 UNet, regional compile", [*ldm4, f"model.compile={compile_}"], n),
        ("shapes_kl, as configured", shapes_kl, 2 * n),  # 2 optimizer steps a batch
        ("shapes_kl, CUDA graphs (reduce-overhead)", [*shapes_kl, f"model.compile={graphs}"],
         2 * n),
        ("shapes_ldm (pixel), as configured", shapes_ldm, 2 * n),
        (f"shapes_ldm (pixel), CUDA graphs, batch {big}",
         [*shapes_ldm, f"model.compile={graphs}", f"data.batch_size={big}"], 2 * n),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (a test)")
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--steps", type=int, default=20, help="timed raw steps per variant")
    p.add_argument("--loop-steps", type=int, default=60, help="batches per entry-point run")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    if not check_installed():
        sys.exit(1)
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if args.cpu_smoke:
        args.batch, args.steps = 4, 2
        torch.set_num_threads(1)
    peak = matmul_peak(device, 256 if args.cpu_smoke else 8192)
    log(f"bf16 matmul: {peak:.1f} TFLOP/s")
    raw = bench_raw_steps(args.batch, args.steps, 1 if args.cpu_smoke else 5, device,
                          args.cpu_smoke, log)
    lines = [row("bf16 matmul peak", peak, "TFLOP/s", note="8192³ random bf16; the % column's "
                 "ceiling" if not args.cpu_smoke else "256³ (smoke)")]
    peer = (raw[0].name.split(",")[0], raw[0].images_per_s) if raw else None
    for r in raw:
        tflops = r.flops * r.images_per_s / args.batch / 1e12
        note = f"host syncs/step: {r.syncs}; attention: {', '.join(r.kernels) or 'none seen'}"
        lines.append(row(f"raw step: {r.name}", r.images_per_s, "images/s", peer, tflops, peak,
                         note))
    ema = compare_updates(build_ours(unet_shape(args.cpu_smoke)).to(device))
    per_tensor = next(iter(ema.values()))["ms"]
    for name, r in ema.items():
        lines.append(row(f"EMA update: {name}", r["ms"], "ms", ("per tensor", per_tensor),
                         note=f"{r['ops']} compute ops, {r['syncs']} host syncs"))
    log("EMA updates:", {name: round(r["ms"], 2) for name, r in ema.items()})
    raw_by_name = {r.name: r.images_per_s for r in raw}
    loop_peers = {"eager": "ours, eager, fused AdamW", "compile": "ours, regional compile, "
                  "fused AdamW"}
    if args.cpu_smoke:  # no fused AdamW on the CPU loop: its raw peer is the default's
        loop_peers["eager"] = "ours, eager, default AdamW (foreach)"
    defaults: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, overrides, steps) in enumerate(loop_runs(args, Path(tmp))):
            warmup = 1 if args.cpu_smoke else max(steps // 3, 2)
            result = train_run(overrides, steps, warmup, Path(tmp) / f"run{i}", timeout=240)
            log(name, result)
            ok = "error" not in result
            if name.startswith("Lightning"):
                peer_name = loop_peers["compile" if "compile" in name else "eager"]
                value = result.get("images_per_s")
                syncs = f"host syncs/batch: {result.get('host_syncs_per_batch')}"
                peer = ("raw step", raw_by_name.get(peer_name, 0.0))
                lines.append(row(name, value, "images/s", peer,
                                 note=syncs if ok else result["error"]))
            else:
                stem = name.split(",")[0]
                value = result.get("batches_per_s")
                peer = (f"{stem} as configured", defaults[stem]) if stem in defaults else None
                if "as configured" in name and ok:
                    defaults[stem] = value
                note = (f"{result['images_per_s']:.0f} images/s; host syncs/batch: "
                        f"{result['host_syncs_per_batch']}") if ok else result["error"]
                lines.append(row(name, value, "batches/s", peer, note=note))
    header = ["| row | measured | × peer (same run) | TFLOP/s | % of peak | notes |",
              "|---|---:|---|---:|---:|---|"]
    gpu = "CPU (smoke)" if args.cpu_smoke else torch.cuda.get_device_name()
    title = f"{gpu}, torch {torch.__version__}, total {time.perf_counter() - START:.0f} s\n\n"
    table = title + "\n".join([*header, *lines]) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table)


if __name__ == "__main__":
    main()
