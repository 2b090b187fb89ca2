"""Time DDPM-1000 against DDPM-100, DDIM-50 and DPM-Solver++(2M)-20 on one model and batch, with
quality, each with "leading" and "trailing" timestep spacing (DPM-Solver-20 also "linspace", and
DPM-Solver-50 "leading": the case of the issue that fixed its grid).

Speed: every sampler drives the same untrained denoiser (a small UNet-like conv net, or the
project's ``UNetModel`` with ``--model unet``) on the same batch; the table gives wall time, model
calls and the speed-up over DDPM-1000 (whose grid, all T timesteps, is the same for every spacing).

Quality: a speed-up means little if the samples are worse, so each configuration also samples
x0 ~ N(mu, s^2), mu = (0.2, -0.5), s = (0.4, 1.0), with that data's exact denoiser
E[eps | x_t] = b (x_t - a mu) / (a^2 s^2 + b^2) (a = sqrt(abar_t), b = sqrt(1 - abar_t)) and
reports the sample std of the first dimension and the largest errors of the sample mean and std
relative to s. Sampling noise alone gives about 1/sqrt(N) and 1/sqrt(2N).

    python experiments/bench/sampler_speed.py
    python experiments/bench/sampler_speed.py --model unet --resolution 16 --batch 4
"""

import argparse
import math
import platform
import time

import torch
from torch import Tensor, nn

from ldm_lightning.diffusion import NoiseSchedule, sample

CONFIGS = [
    ("DDPM-1000", {"sampler": "ddpm", "steps": None}),
    *(
        (
            f"{name}-{steps} {spacing}",
            {"sampler": sampler, "steps": steps, "timestep_spacing": spacing},
        )
        for name, sampler, steps, spacings in [
            ("DDPM", "ddpm", 100, ("leading", "trailing")),
            ("DDIM", "ddim", 50, ("leading", "trailing")),
            ("DPM-Solver++(2M)", "dpmpp_2m", 20, ("leading", "trailing", "linspace")),
            ("DPM-Solver++(2M)", "dpmpp_2m", 50, ("leading",)),
        ]
        for spacing in spacings
    ),
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["conv", "unet"], default="conv")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--width", type=int, default=32, help="base channels of the denoiser")
    p.add_argument("--schedule", default="linear", help="linear | scaled_linear | cosine")
    p.add_argument("--gaussian-samples", type=int, default=20000, help="N for the quality check")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; more make small convs slower on a shared CPU (oversubscription)",
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


class TimeConvNet(nn.Module):
    """Conv in, two time-conditioned residual blocks around one 2x down/up, conv out."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.width = width
        self.time = nn.Sequential(nn.Linear(width, 4 * width), nn.SiLU())
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.block1 = nn.Conv2d(width, width, 3, padding=1)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.up = nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1)
        self.block2 = nn.Conv2d(2 * width, width, 3, padding=1)
        self.film = nn.Linear(4 * width, 3 * width)
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        half = self.width // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=x.device) / half)
        angles = t.float()[:, None] * freqs[None]
        emb = self.time(torch.cat([angles.sin(), angles.cos()], dim=1))
        s1, s2, s3 = self.film(emb)[:, :, None, None].chunk(3, dim=1)
        h = self.inp(x)
        h1 = h + torch.nn.functional.silu(self.block1(h) + s1)
        h2 = torch.nn.functional.silu(self.mid(self.down(h1))) + torch.cat([s2, s3], dim=1)
        h3 = torch.nn.functional.silu(self.block2(torch.cat([self.up(h2), h1], dim=1)))
        return self.out(h3)


def build_model(args: argparse.Namespace) -> tuple[nn.Module, str]:
    if args.model == "unet":
        try:
            from ldm_lightning.nn.unet import UNetModel
        except ImportError as err:
            print(f"ldm_lightning.nn.unet unavailable ({err}); using the conv net instead")
        else:
            unet = UNetModel(
                in_channels=args.channels,
                out_channels=args.channels,
                model_channels=args.width,
                num_res_blocks=1,
                attention_resolutions=[2],
                channel_mult=(1, 2),
                num_head_channels=args.width,
            )
            return unet, "UNetModel"
    return TimeConvNet(args.channels, args.width), "TimeConvNet"


def gaussian_denoiser(schedule: NoiseSchedule, mu: Tensor, std: Tensor):
    """The exact eps-predictor for x0 ~ N(mu, diag(std^2)), samples [N, D]."""

    def model_fn(x_t: Tensor, t: Tensor) -> Tensor:
        abar = schedule.alpha_bar(int(t[0]))
        return math.sqrt(1 - abar) * (x_t - math.sqrt(abar) * mu) / (abar * std**2 + 1 - abar)

    return model_fn


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    schedule = NoiseSchedule.make(args.schedule)
    model, model_name = build_model(args)
    model.eval()
    shape = (args.batch, args.channels, args.resolution, args.resolution)
    calls = {"n": 0}

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        calls["n"] += 1
        return model(x, t)

    mu, std = torch.tensor([0.2, -0.5]), torch.tensor([0.4, 1.0])
    n = args.gaussian_samples
    gaussian = gaussian_denoiser(schedule, mu, std)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"{model_name} ({params / 1e6:.2f} M params), batch {shape}, {args.schedule} schedule, "
        f"CPU {platform.processor() or platform.machine()}, {args.threads} threads, "
        f"torch {torch.__version__}\n"
    )
    rows = []
    for name, config in CONFIGS:
        calls["n"] = 0
        start = time.perf_counter()
        sample(
            model_fn, shape, schedule, generator=torch.Generator().manual_seed(args.seed), **config
        )
        seconds = time.perf_counter() - start
        x = sample(
            gaussian, (n, 2), schedule, generator=torch.Generator().manual_seed(args.seed), **config
        )
        mean_err = ((x.mean(0) - mu).abs() / std).max().item()
        std_err = ((x.std(0) - std).abs() / std).max().item()
        rows.append((name, calls["n"], seconds, x[:, 0].std().item(), mean_err, std_err))

    base = rows[0][2]
    print(
        "| sampler | model calls | wall time (s) | ms / call | speed-up vs DDPM-1000 "
        f"| std, dim 0 (s = {std[0]:.1f}) | mean error / s | std error / s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, n_calls, seconds, std0, mean_err, std_err in rows:
        print(
            f"| {name} | {n_calls} | {seconds:.2f} | {1e3 * seconds / n_calls:.2f} | "
            f"{base / seconds:.1f}x | {std0:.4f} | {mean_err:.4f} | {std_err:.4f} |"
        )
    print(
        f"\nGaussian check: N = {n}, max over 2 dims; sampling noise alone ~ "
        f"{1 / math.sqrt(n):.4f} (mean) and {1 / math.sqrt(2 * n):.4f} (std)."
    )


if __name__ == "__main__":
    main()
