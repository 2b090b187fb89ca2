"""Preemption under SLURM, simulated: SIGUSR1 -> hpc checkpoint -> requeue -> resume, same wandb id.

The SLURM job environment is faked with environment variables and a stand-in ``scontrol`` that
records its arguments; everything else is the real ``trainer=multinode`` configuration.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import pytorch_lightning as pl
from omegaconf import OmegaConf

from ldm_lightning.train import resume_path, train
from tests.hydra_utils import TINY_AUTOENCODER, compose_config

JOB_ID = "4242"
SIGNAL_AT_STEP = 2


class Preempt(pl.Callback):
    """Sends SIGUSR1 to this process after a few steps, as SLURM does before the time limit.

    SLURM would then kill the job; stopping training stands in for that.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == SIGNAL_AT_STEP:
            os.kill(os.getpid(), signal.SIGUSR1)
            trainer.should_stop = True


class StartStep(pl.Callback):
    """Remembers the global step training started from (class-level, in-process)."""

    seen: list[int] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        StartStep.seen.append(trainer.global_step)


@pytest.fixture
def slurm_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A one-task SLURM batch job; returns the file that ``scontrol`` calls are logged to."""
    for key in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(key, raising=False)
    env = {
        "SLURM_JOB_ID": JOB_ID,
        "SLURM_JOB_NAME": "shapes_vq",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    calls = tmp_path / "scontrol_calls.txt"
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.parent.mkdir()
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{scontrol.parent}:{os.environ['PATH']}")
    return calls


def test_sigusr1_checkpoints_requeues_and_the_requeued_job_resumes(
    slurm_job: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"  # the same directory after the requeue, as with submitit
    overrides = [
        "+experiment=shapes_vq",
        *TINY_AUTOENCODER,
        "trainer=multinode",
        "trainer.num_nodes=1",
        "trainer.devices=1",
        "trainer.accelerator=cpu",
        "trainer.strategy=auto",
        "trainer.precision=32-true",
        "trainer.sync_batchnorm=false",
        "trainer.max_epochs=2",
        "matmul_precision=null",
        "logger=wandb",
        "test=false",
        "+callbacks.start._target_=tests.test_scale_slurm.StartStep",
    ]
    StartStep.seen = []
    train(
        compose_config(
            [*overrides, "+callbacks.preempt._target_=tests.test_scale_slurm.Preempt"], run_dir
        )
    )
    assert (run_dir / "hpc_ckpt_1.ckpt").is_file()
    assert slurm_job.read_text().split() == ["requeue", JOB_ID]

    train(compose_config(overrides, run_dir))  # the requeued job: same command, same directory
    # The requeued run restores the hpc checkpoint: it starts at the step of the signal.
    assert StartStep.seen == [0, SIGNAL_AT_STEP]
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    # Both runs carry the same wandb id; wandb suffixes "-1" when they start in the same second.
    assert len(runs) == 2 and all(f"-shapes_vq-{JOB_ID}" in name for name in runs)


def test_an_hpc_checkpoint_wins_over_an_explicit_ckpt_path(
    slurm_job: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = OmegaConf.create({"ckpt_path": str(tmp_path / "old.ckpt")})
    trainer = pl.Trainer(default_root_dir=tmp_path, logger=False, accelerator="cpu")
    assert resume_path(trainer, cfg) == str(tmp_path / "old.ckpt")  # no hpc checkpoint yet
    (tmp_path / "hpc_ckpt_3.ckpt").write_bytes(b"")
    assert resume_path(trainer, cfg) == "hpc"
    monkeypatch.delenv("SLURM_NTASKS")  # not under SLURM: the explicit path stands
    monkeypatch.delenv("SLURM_JOB_NAME", raising=False)
    assert resume_path(trainer, cfg) == str(tmp_path / "old.ckpt")
