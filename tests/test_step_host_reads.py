"""No code of ours reads a number back from the device in a training step.

On a GPU every such read (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``) waits for the
queued kernels: the host stops running ahead of the GPU. On the CPU the same reads dispatch
``aten._local_scalar_dense``, so a step of each kind of model (with the EMA, throughput and
progress callbacks of a real run) is watched for them. The caller of each read, the innermost
frame of its Python stack outside torch, must not be ``ldm_lightning``'s; value checks that run
on host tensors only (``utils.device.on_host``) are told the batch is on an accelerator. Reads
left to torch and Lightning (AdamW's CPU step counters, the EMA's ``AveragedModel`` update
count) are not ours to remove; they are named, not failed.
"""
from __future__ import annotations

import contextlib
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from unittest.mock import patch

import pytest
import pytorch_lightning as pl
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ldm_lightning.train import train
from ldm_lightning.utils.device import on_host
from tests.hydra_utils import TINY_AUTOENCODER, compose_config
from tests.models.test_diffusion_module import TINY_LDM
from tests.test_experiment_matrix import TINY_TEXT

PACKAGE = str(Path(__file__).parents[1] / "ldm_lightning")
TORCH = str(Path(torch.__file__).parent)


class HostReads(TorchDispatchMode):
    """The Python stacks of the device-to-host reads dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.stacks: list[list[str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func.overloadpacket.__name__ == "_local_scalar_dense":
            frames = traceback.extract_stack()[:-1]  # less this method's own frame
            self.stacks.append([f"{f.filename}:{f.lineno}" for f in frames])
        return func(*args, **(kwargs or {}))


def caller(stack: list[str]) -> str:
    """The innermost frame outside torch: the code that asked for the read."""
    return next(frame for frame in reversed(stack) if TORCH not in frame)


class WatchOneStep(pl.Callback):
    """Watches the third training batch, from its start to the end of every batch-end hook
    (it runs after the run's own callbacks). Not a progress line's batch: a line every 50
    steps reads the logged numbers, on purpose."""

    reads: HostReads | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == 0 and batch_idx == 2:
            WatchOneStep.reads = HostReads()
            WatchOneStep.reads.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == 0 and batch_idx == 2:
            WatchOneStep.reads.__exit__(None, None, None)


@contextlib.contextmanager
def accelerator_batches() -> Iterator[None]:
    """Every ``on_host`` answers False, as for a batch on a GPU: the checks that read values
    only on the host (:func:`ldm_lightning.utils.device.on_host`) skip as they would there."""
    users = [m for name, m in sys.modules.items()
             if name.startswith("ldm_lightning") and getattr(m, "on_host", None) is on_host]
    with contextlib.ExitStack() as stack:
        for module in users:
            stack.enter_context(patch.object(module, "on_host", lambda tensor: False))
        yield


PIXELS = ["model.first_stage.identity=true", "data.cache_latents=false"]
TINY_DIT = ["model/backbone=dit_shapes", "model.unet.hidden_size=32", "model.unet.depth=1",
            "model.unet.num_heads=2", "data.image_size=16", "data.batch_size=4",
            "data.num_train=16", "data.num_val=8", "data.num_test=8", "model.sampling.steps=4",
            "model.num_log_images=4", "trainer.max_epochs=1"]
RUNS = {  # id: the experiment and its overrides
    "ldm-ddpm": ["shapes_ldm", *TINY_LDM, *PIXELS],
    "ldm-flow-dit": ["shapes_ldm", *TINY_DIT, *PIXELS, "model/process=flow"],
    "ldm-edm": ["shapes_ldm", *TINY_LDM, *PIXELS, "model/process=edm"],
    "ldm-class": ["shapes_ldm_class", *TINY_LDM, *PIXELS],
    "ldm-text": ["shapes_ldm_text", *TINY_LDM, *PIXELS, "model.conditioning.text_ckpt_path=null",
                 "model.conditioning.freeze_text=false",
                 *(f"model.conditioning.{o}" for o in TINY_TEXT)],
    # The GAN step: manual optimisation, two optimizers, the discriminator's start step.
    "autoencoder-kl": ["shapes_kl", *TINY_AUTOENCODER, "model.loss.disc_start=0",
                       "model.loss.perceptual_weight=0"],
}


@pytest.mark.parametrize("run", sorted(RUNS))
def test_a_training_step_of_ours_reads_nothing_back_from_the_device(
    run: str, tmp_path: Path
) -> None:
    experiment, *overrides = RUNS[run]
    cfg = compose_config([
        f"+experiment={experiment}", *overrides, "test=false", "trainer=cpu", "logger=csv",
        "+callbacks.watch._target_=tests.test_step_host_reads.WatchOneStep",
    ], tmp_path)
    assert "throughput" in cfg.callbacks and "progress_bar" in cfg.callbacks
    with accelerator_batches():
        train(cfg)
    stacks = WatchOneStep.reads.stacks
    assert stacks  # the watch ran: AdamW's and the EMA's own reads at least
    callers = [caller(stack) for stack in stacks]
    ours = [frame for frame in callers if frame.startswith(PACKAGE)]
    assert not ours, ours
    # What is left: Lightning's optimizer step (AdamW's CPU step counters: on a GPU, CPU
    # tensors, no wait) and its EMA callback (AveragedModel's update count, 2 reads).
    assert {frame.rsplit("/", 2)[-1].split(":")[0] for frame in callers} <= {
        "precision.py", "weight_averaging.py"}
