"""A kill loses nothing: SIGKILL a training run mid-epoch, or while it writes last.ckpt, resume
with ``ckpt_path=<run>/checkpoints/last.ckpt`` (into the same run directory, as a requeued job
does), repeatedly, and the run ends at the global step and epoch of an uninterrupted run, with
the same optimizer, scheduler and EMA step counts.

The kills are real: ``python -m ldm_lightning.train`` in a subprocess that SIGKILLs itself,
chosen by config overrides naming the helpers below (about a minute for the three, so they stay
in the default suite). An in-process variant, in which an exception stands in for the kill,
pins the exact step arithmetic.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import pytorch_lightning as pl
import torch

from ldm_lightning.train import train
from ldm_lightning.utils.checkpoint_io import AtomicCheckpointIO
from tests.hydra_utils import TINY_AUTOENCODER, compose_config
from tests.models.test_diffusion_module import TINY_LDM

REPO = Path(__file__).parents[1]
HERE = "tests.test_kill_resume"

# 3 epochs of 4 batches. The discriminator starts at batch 2, so both optimizers step.
AUTOENCODER = ["+experiment=shapes_vq", *TINY_AUTOENCODER, "model.loss.disc_start=2",
               "trainer.max_epochs=3", "test=false", "trainer.enable_progress_bar=false"]
# 3 epochs of 4 batches (one optimizer step each), with the EMA callback of shapes_ldm.
DIFFUSION = ["+experiment=shapes_ldm", *TINY_LDM, "trainer.max_epochs=3", "test=false",
             "trainer.enable_progress_bar=false"]


# ------------------------------------------------------------------ helpers the runs load
class KillAtStep(pl.Callback):
    """SIGKILLs its own process before the first batch that starts at ``global_step >= step``:
    like a preemption or the OOM killer, nothing else runs, nothing is saved."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class Crash(Exception):
    """The in-process stand-in for a kill (ModelCheckpoint does not save on exceptions)."""


class CrashAtStep(KillAtStep):
    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            raise Crash(f"crash at global step {trainer.global_step}")


_torch_save = torch.save


def _write_half_then_die(obj: Any, f: io.BufferedWriter) -> None:
    buffer = io.BytesIO()
    _torch_save(obj, buffer)
    f.write(buffer.getvalue()[: buffer.tell() // 2])
    f.flush()
    os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


class DieWhileReplacingLast(AtomicCheckpointIO):
    """The package's checkpoint IO, except that a save replacing an existing last.ckpt writes
    half of the new bytes and then SIGKILLs the process: a kill in the middle of the write."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
                        ) -> None:
        if Path(path).name == "last.ckpt" and Path(path).exists():
            with mock.patch("torch.save", _write_half_then_die):
                super().save_checkpoint(checkpoint, path, storage_options)
        else:
            super().save_checkpoint(checkpoint, path, storage_options)


# ------------------------------------------------------------------ running and reading
def run_cli(run_dir: Path, overrides: list[str], killed: bool) -> None:
    """``python -m ldm_lightning.train`` writing into ``run_dir`` (resumes write into it too)."""
    result = subprocess.run(
        [sys.executable, "-m", "ldm_lightning.train", *overrides, f"hydra.run.dir={run_dir}",
         f"paths.log_dir={run_dir.parent}", f"paths.cache_dir={run_dir.parent / 'cache'}",
         f"paths.data_dir={run_dir.parent / 'data'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        # Tiny models on a shared 2-core machine: more threads only oversubscribe it.
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    expected = -signal.SIGKILL if killed else 0
    assert result.returncode == expected, result.stderr[-3000:]


def load_last(run_dir: Path) -> dict[str, Any]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


def batches_into_epoch(checkpoint: dict[str, Any]) -> int:
    return checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["ready"]


def step_counts(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Everything that counts steps: trainer, each optimizer's Adam steps, each scheduler, and
    the EMA callback's last update and number of averaged models."""
    counts: dict[str, Any] = {
        "global_step": checkpoint["global_step"],
        "epoch": checkpoint["epoch"],
        "adam_steps": [
            sorted({int(s["step"]) for s in opt["state"].values()})
            for opt in checkpoint["optimizer_states"]
        ],
        "scheduler_steps": [s["_step_count"] for s in checkpoint["lr_schedulers"]],
    }
    for key, state in checkpoint["callbacks"].items():
        if key.startswith("EMAWeightAveraging"):
            counts["ema_latest_update_step"] = state["latest_update_step"]
            counts["ema_n_averaged"] = int(checkpoint["averaging_state"]["n_averaged"])
    return counts


def kill_twice_and_resume(run_dir: Path, overrides: list[str], every_n_train_steps: int,
                          kill_at: tuple[int, int]) -> dict[str, Any]:
    """Two SIGKILLs mid-epoch, each followed by a resume from last.ckpt; the final last.ckpt.

    Each kill comes a few steps after a step-triggered save, so it loses work, and leaves a
    checkpoint from the middle of an epoch to resume from.
    """
    overrides = [*overrides, f"callbacks.last_checkpoint.every_n_train_steps={every_n_train_steps}"]
    resume = f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"
    for i, step in enumerate(kill_at):
        killer = [f"+callbacks.killer._target_={HERE}.KillAtStep", f"+callbacks.killer.step={step}"]
        run_cli(run_dir, [*overrides, *killer, *([resume] if i else [])], killed=True)
        last = load_last(run_dir)
        assert last["global_step"] < step, "the kill should have lost the steps after a save"
        assert 0 < batches_into_epoch(last) < 4, "the kill should leave a mid-epoch checkpoint"
    run_cli(run_dir, [*overrides, resume], killed=False)
    return load_last(run_dir)


@pytest.fixture(scope="module")
def autoencoder_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted 3-epoch autoencoder run's last.ckpt."""
    run = tmp_path_factory.mktemp("ae_reference")
    train(compose_config(AUTOENCODER, run))
    return load_last(run)


# ------------------------------------------------------------------ tests
def test_a_crash_mid_epoch_resumes_to_the_uninterrupted_end(tmp_path: Path) -> None:
    """In-process and 2 epochs: G steps every batch, D from batch 2: 4 + 2 + 4 + 4 = 14 steps."""
    overrides = [*AUTOENCODER, "trainer.max_epochs=2",
                 "callbacks.last_checkpoint.every_n_train_steps=3"]
    crash = [f"+callbacks.crash._target_={HERE}.CrashAtStep", "+callbacks.crash.step=12"]
    with pytest.raises(Crash):
        train(compose_config([*overrides, *crash], tmp_path))
    last = load_last(tmp_path)
    assert (last["global_step"], last["epoch"], batches_into_epoch(last)) == (10, 1, 2)

    train(compose_config([*overrides, f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"],
                         tmp_path))
    assert step_counts(load_last(tmp_path)) == {
        "global_step": 14, "epoch": 1, "adam_steps": [[8], [6]], "scheduler_steps": [9, 9]
    }


def test_sigkills_of_the_autoencoder_lose_nothing(
    autoencoder_reference: dict[str, Any], tmp_path: Path
) -> None:
    # Two optimizers, manual optimisation: global_step 1, 2, 4, 6 | 8, 10, 12, 14 | 16, 18, ...
    # last.ckpt at 4, 6 (epoch end) | 10, killed at 12 | resumed: 14 | 18, killed at 20.
    final = kill_twice_and_resume(tmp_path / "run", AUTOENCODER, 3, kill_at=(12, 20))
    assert step_counts(final) == step_counts(autoencoder_reference)


def test_a_sigkill_while_last_ckpt_is_written_leaves_the_previous_one(
    autoencoder_reference: dict[str, Any], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    dying_io = f"trainer.plugins.0._target_={HERE}.DieWhileReplacingLast"
    every_2 = "callbacks.last_checkpoint.every_n_train_steps=2"
    run_cli(run_dir, [*AUTOENCODER, every_2, dying_io], killed=True)
    # last.ckpt from step 2 is intact; the step-4 one died half-written in its temporary file.
    (partial,) = (run_dir / "checkpoints").glob(".last.ckpt.tmp-*")
    with pytest.raises(Exception):  # noqa: B017 - any failure to read: it is truncated
        torch.load(partial, weights_only=True)
    assert load_last(run_dir)["global_step"] == 2

    resume = f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"
    train(compose_config([*AUTOENCODER, every_2, resume], run_dir))
    assert step_counts(load_last(run_dir)) == step_counts(autoencoder_reference)


def test_sigkills_of_the_latent_diffusion_model_lose_nothing(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    ae_run = tmp_path_factory.mktemp("ae")
    train(compose_config(["+experiment=shapes_vq", *TINY_AUTOENCODER, "test=false"], ae_run))
    overrides = [*DIFFUSION, f"model.first_stage.ckpt_path={ae_run / 'checkpoints/last.ckpt'}"]
    reference_dir = tmp_path / "reference"
    train(compose_config(overrides, reference_dir))
    reference = step_counts(load_last(reference_dir))
    assert reference["ema_n_averaged"] == reference["global_step"] == 12

    # One step a batch: last.ckpt at 2, 4 (epoch end) | 6, killed at 7 | resumed: 8 | 10,
    # killed at 11.
    final = kill_twice_and_resume(tmp_path / "run", overrides, 2, kill_at=(7, 11))
    assert step_counts(final) == reference
