"""`python -m ldm_lightning.train` end to end on tiny shapes: runs, files, resume."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from ldm_lightning.models.checkpoints import checkpoint_kind
from ldm_lightning.train import metric_value, train
from tests.hydra_utils import TINY_AUTOENCODER, compose_config

REPO = Path(__file__).parents[1]


@pytest.mark.parametrize("experiment", ["shapes_vq", "shapes_kl"])
def test_fast_dev_run(experiment: str, tmp_path: Path) -> None:
    overrides = [
        o
        for o in TINY_AUTOENCODER
        if not o.startswith("model.n_embed") or experiment == "shapes_vq"
    ]
    cfg = compose_config([f"+experiment={experiment}", "debug=fdr", *overrides], tmp_path)
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["val/rec_loss"]))
    assert "train/rec_loss" in metrics
    saved = OmegaConf.load(tmp_path / "config.yaml")
    assert saved.model.regularizer == experiment.split("_")[1]
    assert "CONFIG" in (tmp_path / "config_tree.log").read_text()


def test_a_run_writes_checkpoint_reconstruction_grid_and_psnr(tmp_path: Path) -> None:
    cfg = compose_config(["+experiment=shapes_vq", *TINY_AUTOENCODER], tmp_path)
    metrics = train(cfg)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint_kind(checkpoint) == "autoencoder"
    grids = list((tmp_path / "images").glob("reconstructions_epoch000_*.png"))
    assert len(grids) == 1 and grids[0].stat().st_size > 0
    assert 0 < metrics["test/psnr"] < 100 and "test/codebook_usage" in metrics
    assert metric_value(metrics, cfg.optimized_metric) == pytest.approx(metrics["val/rec_loss"])
    assert (tmp_path / "csv" / "metrics.csv").is_file()


def test_a_sweep_needs_its_optimized_metric_logged() -> None:
    with pytest.raises(KeyError, match="was not logged.*val_check_interval"):
        metric_value({"val/loss": 1.0}, "val/fid", sweep=True)


def test_outside_a_sweep_a_missing_optimized_metric_is_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="ldm_lightning.train"):
        assert metric_value({"train/loss": 1.0, "test/psnr": 20.0}, "val/rec_loss") is None
    assert "optimized_metric='val/rec_loss' was not logged: no validation ran" in caplog.text
    assert "['test/psnr', 'train/loss']" in caplog.text


def test_resume_continues_global_step_and_optimizer_state(tmp_path: Path) -> None:
    first = compose_config(
        ["+experiment=shapes_vq", *TINY_AUTOENCODER, "test=false", "model.loss.disc_start=2"],
        tmp_path / "a",
    )
    train(first)
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    # 4 batches: G steps on all 4, D steps from batch 2 on: 4 + 2 optimizer steps.
    assert saved["global_step"] == 6 and saved["state_dict"]["train_batches"] == 4

    second = compose_config(
        [
            "+experiment=shapes_vq",
            *TINY_AUTOENCODER,
            "test=false",
            "model.loss.disc_start=2",
            "trainer.max_epochs=2",
            f"ckpt_path={last}",
        ],
        tmp_path / "b",
    )
    train(second)
    resumed = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["epoch"] == 1 and resumed["state_dict"]["train_batches"] == 8
    assert resumed["global_step"] == 6 + 8
    adam_g = resumed["optimizer_states"][0]["state"]
    assert int(next(iter(adam_g.values()))["step"]) == 8


def test_command_line_entry_point(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ldm_lightning.train",
            "+experiment=shapes_vq",
            "debug=fdr",
            *TINY_AUTOENCODER,
            f"hydra.run.dir={run_dir}",
            f"paths.log_dir={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "config.yaml").is_file() and (run_dir / ".hydra" / "overrides.yaml").is_file()


def test_a_run_writing_to_a_file_logs_progress_and_warns_of_an_unlogged_metric(
    tmp_path: Path,
) -> None:
    """stdout to a file (nohup, SLURM, CI): progress lines as training runs, not a rich bar at
    the end; and a run that never validated still exits 0, warning that val/rec_loss is not
    there."""
    run_dir = tmp_path / "run"
    with (tmp_path / "stdout.txt").open("w") as stdout:
        result = subprocess.run(
            [
                sys.executable, "-m", "ldm_lightning.train", "+experiment=shapes_vq",
                *TINY_AUTOENCODER, "trainer.max_steps=2", "+trainer.limit_val_batches=0",
                "callbacks.progress_bar.every_n_steps=1",
                f"hydra.run.dir={run_dir}", f"paths.log_dir={tmp_path}",
            ],
            cwd=REPO, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=300,
        )
    output = (tmp_path / "stdout.txt").read_text()
    assert result.returncode == 0, output[-2000:] + result.stderr[-2000:]
    lines = output.splitlines()
    steps = [
        (i, int(m[1])) for i, line in enumerate(lines)
        if (m := re.search(r"^.*\bepoch 0/0 batch \d+/4 step (\d+)/2 .*train/rec_loss=\d", line))
    ]
    assert [step for _, step in steps] == [1, 2, 2], output  # two steps, then the epoch's end
    assert "end of epoch" in lines[steps[-1][0]]
    testing = next(i for i, line in enumerate(lines) if line.endswith("Testing: 2 batches"))
    assert steps[-1][0] < testing  # written as training ran, before testing
    assert "optimized_metric='val/rec_loss' was not logged: no validation ran" in output
    assert "step 2/2" in (run_dir / "train.log").read_text()  # Hydra's log file has them too


def test_run_directories_follow_task_and_time(tmp_path: Path) -> None:
    compose_config(["+experiment=shapes_vq"], tmp_path)
    hydra_cfg = HydraConfig.get()
    run_dir, sweep_dir = hydra_cfg.run.dir, hydra_cfg.sweep.dir
    assert "/shapes_vq/runs/" in run_dir and "/shapes_vq/multiruns/" in sweep_dir


def test_last_checkpoint_is_the_final_epoch_even_when_it_did_not_improve(tmp_path: Path) -> None:
    """mode=max on a falling loss: only epoch 0 is ever "best"; last.ckpt must still move on."""
    cfg = compose_config(
        ["+experiment=shapes_vq", *TINY_AUTOENCODER, "test=false", "trainer.max_epochs=3",
         "callbacks.model_checkpoint.mode=max", "model.loss.disc_start=1000"],
        tmp_path,
    )
    train(cfg)
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == ["epoch000-step000004.ckpt", "last.ckpt"]
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["epoch"] == 2 and last["state_dict"]["train_batches"] == 12
