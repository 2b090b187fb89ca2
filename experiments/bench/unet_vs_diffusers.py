"""Benchmark our UNetModel against diffusers' UNet2DModel of the same shape.

Both models get the same widths (``model_channels * channel_mult``), ResBlocks per level,
self-attention at the same downsampling factors with the same head width, and scale-shift
time conditioning. The script prints parameter counts and the median wall time of one
training step (forward, mean-squared loss, backward) after warm-up, in fp32 for both and with
bf16 autocast for ours, as a markdown table.

    python experiments/bench/unet_vs_diffusers.py                 # shapes-LDM-sized default
    python experiments/bench/unet_vs_diffusers.py --resolution 32 --batch 8 --steps 10
"""

import argparse
import contextlib
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from ldm_lightning.nn.unet import UNetModel


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--channels", type=int, default=3, help="latent channels (in = out)")
    p.add_argument("--resolution", type=int, default=16, help="latent height = width")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--model-channels", type=int, default=64)
    p.add_argument("--channel-mult", type=int, nargs="+", default=[1, 2, 2])
    p.add_argument("--num-res-blocks", type=int, default=2)
    p.add_argument(
        "--attention-ds",
        type=int,
        nargs="+",
        default=[2, 4],
        help="downsampling factors with self-attention",
    )
    p.add_argument("--head-channels", type=int, default=32, help="channels per attention head")
    p.add_argument("--no-scale-shift", action="store_true", help="additive time embedding")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 keeps timings stable on a shared machine, where oversubscribed "
        "threads slowed steps 20x",
    )
    return p.parse_args()


def build_ours(args: argparse.Namespace) -> UNetModel:
    return UNetModel(
        in_channels=args.channels,
        out_channels=args.channels,
        model_channels=args.model_channels,
        num_res_blocks=args.num_res_blocks,
        attention_resolutions=args.attention_ds,
        channel_mult=tuple(args.channel_mult),
        num_head_channels=args.head_channels,
        use_scale_shift_norm=not args.no_scale_shift,
    )


def build_diffusers(args: argparse.Namespace) -> nn.Module:
    """diffusers' UNet2DModel of ``args``' shape (imported here: experiments/bench/gpu.py runs
    without diffusers)."""
    from diffusers import UNet2DModel

    attn = [2**level in args.attention_ds for level in range(len(args.channel_mult))]
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    return UNet2DModel(
        sample_size=args.resolution,
        in_channels=args.channels,
        out_channels=args.channels,
        block_out_channels=tuple(args.model_channels * m for m in args.channel_mult),
        layers_per_block=args.num_res_blocks,
        down_block_types=down,
        up_block_types=up,
        attention_head_dim=args.head_channels,
        attn_norm_num_groups=32,
        resnet_time_scale_shift="default" if args.no_scale_shift else "scale_shift",
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def train_step(
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    model: nn.Module,
    args: argparse.Namespace,
    bf16: bool,
) -> Callable[[], None]:
    """One step of forward, MSE to fixed noise, backward (no optimiser), on a fixed batch."""
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, args.channels, args.resolution, args.resolution)
    x, eps = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    t = torch.randint(0, 1000, (args.batch,), generator=gen)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            out = forward(x, t)
        (out.float() - eps).square().mean().backward()
        model.zero_grad(set_to_none=True)

    return step


def median_times(steps: list[Callable[[], None]], args: argparse.Namespace) -> list[float]:
    """Median seconds per step; rounds alternate between the steps so that a drifting load
    (a shared machine) affects every model alike."""
    times: list[list[float]] = [[] for _ in steps]
    for i in range(args.warmup + args.steps):
        for step, record in zip(steps, times, strict=True):
            start = time.perf_counter()
            step()
            if i >= args.warmup:
                record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours, ref = build_ours(args).train(), build_diffusers(args).train()
    runs = [
        ("ours", "fp32", ours, train_step(lambda x, t: ours(x, t), ours, args, bf16=False)),
        (
            "diffusers UNet2DModel",
            "fp32",
            ref,
            train_step(lambda x, t: ref(x, t).sample, ref, args, bf16=False),
        ),
        ("ours", "bf16 autocast", ours, train_step(lambda x, t: ours(x, t), ours, args, bf16=True)),
    ]
    seconds = median_times([step for *_, step in runs], args)
    ref_time = seconds[1]

    import diffusers

    print(
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"{platform.processor() or platform.machine()}, {args.threads} threads"
    )
    print(
        f"batch {args.batch} x {args.channels} x {args.resolution}^2, model_channels "
        f"{args.model_channels}, channel_mult {tuple(args.channel_mult)}, num_res_blocks "
        f"{args.num_res_blocks}, attention at ds {args.attention_ds}, head width "
        f"{args.head_channels}; median of {args.steps} rounds after {args.warmup} warm-up\n"
    )
    print("| model | precision | parameters | fwd+bwd step (ms) | time / diffusers fp32 |")
    print("|---|---|---:|---:|---:|")
    for (name, prec, model, _), sec in zip(runs, seconds, strict=True):
        params = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {prec} | {params:,} | {sec * 1e3:.0f} | {sec / ref_time:.2f} |")


if __name__ == "__main__":
    main()
