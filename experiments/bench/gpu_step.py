"""The raw training step of experiments/bench/gpu.py: the celebahq-ldm-vq-4 UNet without Lightning.

One step = timesteps and noise drawn on the device (a device generator), ``q_sample``, forward
under bf16 autocast, MSE to the noise, backward, AdamW step: what ``LatentDiffusionModule``'s
training step does, minus Lightning. Measured per variant: images/s (mean over timed steps
between two device synchronisations), model FLOPs of one step (``FlopCounterMode``, eager), host
synchronisations in one step (CUDA: ``torch.cuda.set_sync_debug_mode``) and the attention
kernels that ran (profiler event names).
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from unet_vs_diffusers import build_diffusers, build_ours

from ldm_lightning.diffusion import NoiseSchedule
from ldm_lightning.models.speed import apply_speed_switches


@dataclass
class StepResult:
    name: str
    images_per_s: float
    flops: float  # of one step, forward + backward
    syncs: int | None  # host synchronisations in one step (CUDA only)
    kernels: list[str]  # attention ops/kernels seen in one step


def unet_shape(smoke: bool) -> argparse.Namespace:
    """CompVis celebahq-ldm-vq-4 (conf/model/backbone/unet.yaml) on 3x64x64 latents, in
    unet_vs_diffusers' terms; ``smoke``: a tiny UNet on 3x16x16."""
    if smoke:
        return argparse.Namespace(channels=3, resolution=16, model_channels=32, channel_mult=[1, 2],
                                  num_res_blocks=1, attention_ds=[2], head_channels=16,
                                  no_scale_shift=False)
    return argparse.Namespace(channels=3, resolution=64, model_channels=224,
                              channel_mult=[1, 2, 3, 4], num_res_blocks=2, attention_ds=[8, 4, 2],
                              head_channels=32, no_scale_shift=False)


def make_step(
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], model: nn.Module,
    shape: argparse.Namespace, batch: int, device: torch.device, fused: bool | None,
) -> Callable[[], None]:
    """One optimizer step of L_simple (DDPM eq. 14) on a fixed batch ``x0``, fresh t and noise
    drawn on ``device``; ``fused``: AdamW's kernel (None: torch's default, foreach on CUDA)."""
    schedule = NoiseSchedule.make("scaled_linear", timesteps=1000).to(device)
    generator = torch.Generator(device).manual_seed(0)
    size = (batch, shape.channels, shape.resolution, shape.resolution)
    x0 = torch.randn(size, generator=generator, device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)

    def step() -> None:
        t = torch.randint(0, 1000, (batch,), generator=generator, device=device)
        eps = torch.randn(size, generator=generator, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = forward(schedule.q_sample(x0, t, eps), t)
        F.mse_loss(out.float(), eps).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_step(step: Callable[[], None], steps: int, warmup: int,
                     device: torch.device) -> float:
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def count_flops(step: Callable[[], None]) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def count_syncs(step: Callable[[], None], device: torch.device) -> int | None:
    """Host synchronisations one step makes (CUDA's sync debug mode warns at each)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
            synchronize(device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def attention_kernels(step: Callable[[], None]) -> list[str]:
    """Names of the attention ops and GPU kernels of one step (which SDPA backend ran)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
    keys = ("scaled_dot_product", "flash", "fmha", "attention", "cudnn_sdpa")
    names = {e.name for e in prof.events() if any(k in e.name.lower() for k in keys)
             and not e.name.startswith("autograd::") and not e.name.endswith("Backward0")}
    return sorted(name[:80] for name in names)


def variants(shape: argparse.Namespace, smoke: bool) -> list[tuple[str, Callable, bool | None]]:
    """``(name, build, fused)``; ``build()`` returns ``(model, forward)``. Each row adds one
    change to the one before it; diffusers first (the peer of every raw row)."""
    compile_options = {"regional": True, "backend": "aot_eager" if smoke else "inductor"}

    def ours(compiled: bool) -> Callable:
        def build() -> tuple[nn.Module, Callable]:
            model = build_ours(shape)
            if compiled:
                apply_speed_switches([model], compile_options, channels_last=False)
            return model, model

        return build

    def diffusers() -> tuple[nn.Module, Callable]:
        model = build_diffusers(shape)
        return model, lambda x, t: model(x, t).sample

    return [
        ("diffusers UNet2DModel, eager, fused AdamW", diffusers, True),
        ("ours, eager, default AdamW (foreach)", ours(False), None),
        ("ours, eager, fused AdamW", ours(False), True),
        ("ours, regional compile, fused AdamW", ours(True), True),
    ]


def bench_raw_steps(batch: int, steps: int, warmup: int, device: torch.device,
                    smoke: bool, log: Callable[..., None]) -> list[StepResult]:
    shape = unet_shape(smoke)
    results: list[StepResult] = []
    eager_flops = None
    for name, build, fused in variants(shape, smoke):
        try:
            torch.manual_seed(0)
            model, forward = build()
        except ImportError as error:
            log(f"skipped {name}: {error}")
            continue
        model = model.to(device).train()
        step = make_step(forward, model, shape, batch, device, fused)
        seconds = seconds_per_step(step, steps, warmup, device)
        compiled = "compile" in name
        flops = eager_flops if compiled and eager_flops else count_flops(step)
        if name.startswith("ours") and not compiled:
            eager_flops = flops
        result = StepResult(name, batch / seconds, flops, count_syncs(step, device),
                            attention_kernels(step))
        log(f"{name}: {result.images_per_s:.1f} images/s, {result.syncs} syncs, "
            f"attention: {result.kernels}")
        results.append(result)
        del model, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results
