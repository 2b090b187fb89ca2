"""Training throughput of the shapes LDM UNet and the shapes autoencoder, each speed switch on/off.

One full optimizer step per iteration on a fixed set of synthetic-shapes batches (same data,
same timesteps and noise, same seed for every variant):

- LDM: ``L_simple`` (DDPM eq. 14) of the shapes_ldm UNet on 3x8x8 "latents" (shapes images
  rendered at 8 px stand in for the f=4 latents of 32 px images), AdamW; against diffusers'
  UNet2DModel of the same configuration (``unet_vs_diffusers.build_diffusers``) in fp32.
- Autoencoder: the shapes_vq generator step (L1 + codebook + adaptive-weight GAN) and the
  PatchGAN discriminator step on 32 px images, Adam.

Switches: fp32, bf16 autocast, channels_last, torch.compile (inductor), gradient checkpointing
(UNet only). Prints images/s, the ratio to the reference (diffusers fp32 / our AE fp32), FLOP/s
counted with ``torch.utils.flop_counter.FlopCounterMode`` and, with ``--peak-tflops``, the
model FLOP utilisation MFU = achieved FLOP/s / peak; and the mean loss of the last 5 of
``--steps`` steps ("same loss within noise").

    python experiments/bench/throughput.py                  # CPU, ~1.5 minutes
    python experiments/bench/throughput.py --compile        # + torch.compile rows (~5 minutes)
    python experiments/bench/throughput.py --device cuda --peak-tflops 989 --batch 256 --compile
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from unet_vs_diffusers import build_diffusers

from ldm_lightning.data.shapes import ShapesDataset
from ldm_lightning.diffusion import NoiseSchedule
from ldm_lightning.models import AutoencoderModule
from ldm_lightning.nn.unet import UNetModel

LDM_SWITCHES = ("fp32", "bf16", "channels_last", "compile", "checkpointing", "bf16+channels_last")
AE_SWITCHES = ("fp32", "bf16", "channels_last", "compile", "bf16+channels_last")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--batch", type=int, default=64, help="LDM batch (shapes_ldm: 64)")
    p.add_argument("--ae-batch", type=int, default=32, help="autoencoder batch (shapes_vq: 32)")
    p.add_argument("--steps", type=int, default=30, help="LDM optimizer steps per variant")
    p.add_argument("--ae-steps", type=int, default=10, help="autoencoder steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; 1 keeps timings stable on a shared machine (2 threads on 2 "
        "busy cores made steps up to 30x slower)",
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak, for MFU")
    p.add_argument(
        "--compile",
        action="store_true",
        help="add the torch.compile rows (inductor; a cold compile cache adds ~3 min on 2 cores)",
    )
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune")
    return p.parse_args()


@dataclass
class Result:
    name: str
    batch: int
    seconds: float  # median per optimizer step
    flops: float  # model FLOPs of one step (forward + backward), recomputation not counted
    final_loss: float

    @property
    def images_per_s(self) -> float:
        return self.batch / self.seconds


def autocast(device: str, bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def run(
    name: str,
    step: Callable[[int], torch.Tensor],
    args: argparse.Namespace,
    batch: int,
    steps: int,
    flops: float | None = None,
) -> Result:
    """``steps`` steps; median time of those after warm-up; FLOPs of one extra step
    unless given (compiled and checkpointed variants reuse their eager model's count)."""
    times, losses = [], []
    for i in range(steps):
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        losses.append(step(i).item())
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if flops is None:
        counter = FlopCounterMode(display=False)
        with counter:
            step(0)
        flops = counter.get_total_flops()
    seconds = statistics.median(times[args.warmup :])
    return Result(name, batch, seconds, flops, statistics.mean(losses[-5:]))


# ---------------------------------------------------------------- latent diffusion UNet
def unet_args() -> argparse.Namespace:
    """The shapes_ldm UNet (conf/model/backbone/unet_shapes.yaml) in unet_vs_diffusers' terms."""
    return argparse.Namespace(
        channels=3,
        resolution=8,
        model_channels=64,
        channel_mult=[1, 2, 2],
        num_res_blocks=1,
        attention_ds=[2, 4],
        head_channels=32,
        no_scale_shift=False,
    )


def ldm_step(
    model: nn.Module, forward: Callable, data: torch.Tensor, args: argparse.Namespace, switch: str
) -> Callable[[int], torch.Tensor]:
    """One AdamW step of L_simple on batch ``i % len(data)`` with fixed t and eps."""
    schedule = NoiseSchedule.make("scaled_linear", timesteps=1000).to(args.device)
    gen = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (len(data), data.shape[1]), generator=gen).to(args.device)
    eps = torch.randn(data.shape, generator=gen).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    bf16 = "bf16" in switch
    fmt = torch.channels_last if "channels_last" in switch else torch.contiguous_format

    def step(i: int) -> torch.Tensor:
        k = i % len(data)
        z_t = schedule.q_sample(data[k], t[k], eps[k]).contiguous(memory_format=fmt)
        with autocast(args.device, bf16):
            out = forward(z_t, t[k])
        loss = F.mse_loss(out.float(), eps[k])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def bench_ldm(args: argparse.Namespace, data: torch.Tensor) -> list[Result]:
    shape = unet_args()
    results = []
    for switch in ("diffusers fp32", *LDM_SWITCHES):
        if switch == "compile" and not args.compile:
            continue
        torch.manual_seed(0)
        if switch.startswith("diffusers"):
            model = build_diffusers(shape).to(args.device).train()
            forward = lambda x, t, m=model: m(x, t).sample  # noqa: E731
        else:
            model = UNetModel(
                in_channels=3,
                out_channels=3,
                model_channels=shape.model_channels,
                channel_mult=tuple(shape.channel_mult),
                num_res_blocks=shape.num_res_blocks,
                attention_resolutions=shape.attention_ds,
                num_head_channels=shape.head_channels,
                use_checkpoint=switch == "checkpointing",
            ).to(args.device)
            if "channels_last" in switch:
                model.to(memory_format=torch.channels_last)
            if switch == "compile":
                model.compile(mode=args.compile_mode)
            forward = model
        name = f"LDM UNet, {'ours ' if not switch.startswith('diffusers') else ''}{switch}"
        eager_flops = results[1].flops if switch in ("compile", "checkpointing") else None
        step = ldm_step(model, forward, data, args, switch)
        results.append(run(name, step, args, args.batch, args.steps, eager_flops))
    return results


# ---------------------------------------------------------------- autoencoder
def shapes_vq() -> AutoencoderModule:
    """The shapes_vq autoencoder (conf/experiment/shapes_vq.yaml), without LPIPS."""
    return AutoencoderModule(
        image_size=32,
        ch=32,
        ch_mult=(1, 2, 2),
        num_res_blocks=1,
        n_embed=256,
        ema_codebook=True,
        loss={
            "perceptual_weight": 0.0,
            "disc_start": 0,
            "disc_weight": 0.1,
            "disc_ndf": 32,
            "disc_num_layers": 2,
        },
    )


def ae_step(
    ae: AutoencoderModule, images: torch.Tensor, args: argparse.Namespace, switch: str
) -> Callable[[int], torch.Tensor]:
    """The module's training step without Lightning: generator step, then discriminator step."""
    gen_params = [p for n, p in ae.named_parameters() if not n.startswith("loss.discriminator")]
    opt_g = torch.optim.Adam(gen_params, lr=1e-3, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(ae.loss.discriminator.parameters(), lr=1e-3, betas=(0.5, 0.9))
    bf16 = "bf16" in switch
    fmt = torch.channels_last if "channels_last" in switch else torch.contiguous_format

    def step(i: int) -> torch.Tensor:
        x = images[i % len(images)].contiguous(memory_format=fmt)
        with autocast(args.device, bf16):
            x_hat, reg, _ = ae(x)
            loss_g, logs = ae.loss.generator_loss(x, x_hat, reg, i, ae.decoder.last_layer)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        with autocast(args.device, bf16):
            loss_d, _ = ae.loss.discriminator_loss(x, x_hat, i)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        return logs["rec"].detach()

    return step


def bench_autoencoder(args: argparse.Namespace, images: torch.Tensor) -> list[Result]:
    results = []
    for switch in AE_SWITCHES:
        if switch == "compile" and not args.compile:
            continue
        torch.manual_seed(0)
        ae = shapes_vq().to(args.device).train()
        if "channels_last" in switch:
            ae.to(memory_format=torch.channels_last)
        if switch == "compile":
            ae.encoder.compile(mode=args.compile_mode)
            ae.decoder.compile(mode=args.compile_mode)
        step = ae_step(ae, images, args, switch)
        eager_flops = results[0].flops if switch == "compile" else None
        name = f"autoencoder, {switch}"
        results.append(run(name, step, args, args.ae_batch, args.ae_steps, eager_flops))
    return results


def shapes_batches(n_batches: int, batch: int, size: int, device: str) -> torch.Tensor:
    """``[n_batches, batch, 3, size, size]`` synthetic shapes in [-1, 1] (train split, seed 0)."""
    dataset = ShapesDataset(n_batches * batch, size)
    images = torch.stack([dataset[i]["image"] for i in range(n_batches * batch)])
    return images.view(n_batches, batch, 3, size, size).to(device)


def print_table(results: list[Result], reference: Result, args: argparse.Namespace) -> None:
    mfu_header = " MFU |" if args.peak_tflops else ""
    print(f"| variant | images/s | × {reference.name} | GFLOP/s | loss (last 5) |{mfu_header}")
    print("|---|---:|---:|---:|---:|" + ("---:|" if args.peak_tflops else ""))
    for r in results:
        flops_per_s = r.flops / r.seconds
        mfu = f" {flops_per_s / (args.peak_tflops * 1e12):.1%} |" if args.peak_tflops else ""
        print(
            f"| {r.name} | {r.images_per_s:.0f} | {r.images_per_s / reference.images_per_s:.2f} "
            f"| {flops_per_s / 1e9:.1f} | {r.final_loss:.4f} |{mfu}"
        )
    print()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    latents = shapes_batches(4, args.batch, 8, args.device)
    images = shapes_batches(4, args.ae_batch, 32, args.device)
    ldm = bench_ldm(args, latents)
    ae = bench_autoencoder(args, images)
    device = torch.cuda.get_device_name() if args.device == "cuda" else (
        platform.processor() or platform.machine()
    )
    total = time.perf_counter() - start
    print(
        f"torch {torch.__version__}, {device}, {args.threads} threads; {args.steps} LDM / "
        f"{args.ae_steps} autoencoder steps per variant, median step time after {args.warmup} "
        f"warm-up steps; total {total:.0f} s (compile included)\n"
    )
    print_table(ldm, ldm[0], args)
    print_table(ae, ae[0], args)


if __name__ == "__main__":
    main()
