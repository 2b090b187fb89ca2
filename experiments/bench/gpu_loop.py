"""Training runs through the project's entry point for experiments/bench/gpu.py.

Each run is ``python -m ldm_lightning.train <overrides>`` in a subprocess (a fresh process, as a
user starts it), with :class:`StepTimes` added as a callback: it times the batches after
``warmup`` between two device synchronisations, counts the host synchronisations of one loop
iteration on CUDA, and writes both to a JSON file the bench reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from ldm_lightning.callbacks.throughput import batch_size_of

HERE = Path(__file__).parent


class StepTimes(pl.Callback):
    """Batches per second and images per second after ``warmup`` batches, written to ``out``."""

    def __init__(self, out: str, warmup: int) -> None:
        self.out, self.warmup = Path(out), warmup
        self.batches = 0
        self.images = 0
        self.start: float | None = None
        self.syncs: int | None = None
        self._caught: Any = None

    def _sync(self, module: pl.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if pl_module.device.type != "cuda" or self.batches not in (self.warmup, self.warmup + 1):
            return
        if self.batches == self.warmup:  # one whole loop iteration, batch start to batch start
            self._caught = warnings.catch_warnings(record=True)
            self._records = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        else:
            torch.cuda.set_sync_debug_mode("default")
            self._caught.__exit__(None, None, None)
            self.syncs = sum("synchroniz" in str(w.message) for w in self._records)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self.batches += 1
        if self.batches == self.warmup:
            self._sync(pl_module)
            self.start = time.perf_counter()
        elif self.batches > self.warmup:
            self.images += batch_size_of(batch)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(pl_module)
        if self.start is None:
            raise RuntimeError(f"only {self.batches} batches ran; StepTimes needs > {self.warmup}")
        seconds = time.perf_counter() - self.start
        timed = self.batches - self.warmup
        self.out.write_text(json.dumps({
            "batches_per_s": timed / seconds, "images_per_s": self.images / seconds,
            "timed_batches": timed, "host_syncs_per_batch": self.syncs,
        }))


def train_run(overrides: list[str], steps: int, warmup: int, work: Path,
              timeout: float) -> dict[str, Any]:
    """Run the entry point for ``steps`` batches; StepTimes' JSON, or ``{"error": ...}``."""
    work.mkdir(parents=True, exist_ok=True)
    out = work / "step_times.json"
    command = [
        sys.executable, "-m", "ldm_lightning.train", *overrides,
        f"trainer.max_steps={steps}", "+trainer.limit_val_batches=0", "test=false",
        "~callbacks.image_logger", "~callbacks.model_checkpoint", "~callbacks.last_checkpoint",
        "+callbacks.step_times._target_=gpu_loop.StepTimes",
        f"+callbacks.step_times.out={out}", f"+callbacks.step_times.warmup={warmup}",
        f"hydra.run.dir={work}",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(HERE), str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    (work / "output.log").write_text(done.stdout + done.stderr)
    if done.returncode or not out.exists():
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        return {"error": lines[-1][:200] if lines else f"exit {done.returncode}"}
    return json.loads(out.read_text())
