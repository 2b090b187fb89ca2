"""One EMA update of the celebahq-ldm-vq-4 UNet (285.7M parameters): Lightning's
``EMAWeightAveraging`` (a per-tensor ``avg_fn``) against ``callbacks.ema.ForeachEMA`` (torch's
multi-tensor ``get_ema_multi_avg_fn``), each as the callback builds its ``AveragedModel``.

Per update: the aten operations dispatched that compute (each one a kernel launch on a GPU,
what keeps a GPU waiting on the host when the step itself is short; ``detach`` and other views
are not counted), the host synchronisations among them (``_local_scalar_dense``: reading a
device number on the host) and the wall time (median of ``--repeats``,
on the device the script finds: CUDA if present, else the CPU, where the update is memory-bound
and the launch count matters less). Checks that both give the same average.

    python experiments/bench/ema_update.py            # LDM-4 UNet
    python experiments/bench/ema_update.py --smoke    # a tiny UNet
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import torch
from gpu_step import unet_shape
from pytorch_lightning.callbacks import EMAWeightAveraging
from torch.optim.swa_utils import AveragedModel
from torch.utils._python_dispatch import TorchDispatchMode
from unet_vs_diffusers import build_ours

from ldm_lightning.callbacks.ema import ForeachEMA

VIEWS = {"aten.detach", "aten.alias", "aten.view", "aten._unsafe_view"}  # no kernel


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(callback: EMAWeightAveraging, model: torch.nn.Module, repeats: int) -> dict:
    """Ops and time of one update after the first (which copies the weights)."""
    averaged = AveragedModel(model, use_buffers=True, **callback._kwargs)
    averaged.update_parameters(model)  # the copy
    with CountOps() as counter:
        averaged.update_parameters(model)
    times = []
    for _ in range(repeats):
        synchronize(next(model.parameters()).device)
        start = time.perf_counter()
        averaged.update_parameters(model)
        synchronize(next(model.parameters()).device)
        times.append(time.perf_counter() - start)
    compute = Counter({op: n for op, n in counter.ops.items() if op not in VIEWS})
    return {"ops": sum(compute.values()), "top": compute.most_common(3),
            "syncs": counter.ops["aten._local_scalar_dense"],
            "ms": 1000 * statistics.median(times), "averaged": averaged}


def compare_updates(model: torch.nn.Module, repeats: int = 5) -> dict[str, dict]:
    """Both callbacks' updates of ``model`` from the same random weights: ``{name: {ops, top,
    syncs, ms}}``, per-tensor first; raises if their averages differ."""
    results = {}
    for name, callback in [("EMAWeightAveraging (per tensor)", EMAWeightAveraging(decay=0.999)),
                           ("ForeachEMA (foreach)", ForeachEMA(decay=0.999))]:
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
        results[name] = measure(callback, model, repeats)
    a, b = (result.pop("averaged") for result in results.values())
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_ours(unet_shape(args.smoke)).to(device)
    tensors = len(list(model.parameters())) + len(list(model.buffers()))
    print(f"UNet: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters in "
          f"{tensors} tensors, {device}")
    results = compare_updates(model, args.repeats)
    print("| EMA update | compute ops | most dispatched | host syncs | ms |\n"
          "|---|---:|---|---:|---:|")
    for name, r in results.items():
        top = ", ".join(f"{op} {n}" for op, n in r["top"])
        print(f"| {name} | {r['ops']} | {top} | {r['syncs']} | {r['ms']:.1f} |")
    per_tensor, foreach = results.values()
    print(f"foreach: {per_tensor['ops'] / foreach['ops']:.0f}x fewer ops, "
          f"{per_tensor['ms'] / foreach['ms']:.2f}x the speed on {device}; same average")


if __name__ == "__main__":
    main()
