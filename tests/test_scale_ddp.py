"""Two-process CPU DDP (gloo) and a Hydra multirun, through the command line as users run them."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from ldm_lightning.train import train
from tests.hydra_utils import TINY_AUTOENCODER, compose_config
from tests.models.test_diffusion_module import TINY_LDM

REPO = Path(__file__).parents[1]


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """One hash over names and exact bytes of a state dict."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


class RankProbe(pl.Callback):
    """Writes what each rank holds to ``<out_dir>/rank<r>.json`` (test helper, run by the CLI)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.record: dict = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        clone = torch.Generator().set_state(pl_module.noise_generator.get_state())
        self.record.update(
            noise_seed=pl_module.noise_generator.initial_seed(),
            first_timesteps=torch.randint(0, 1000, (8,), generator=clone).tolist(),
            scale_factor=pl_module.scale_factor,
            train_latents=tensors_sha256(
                {"latents": trainer.datamodule.datasets["train"].cache.read("latents")}
            ),
        )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.record.update(
            weights=tensors_sha256(pl_module.state_dict()),
            world_size=trainer.world_size,
            global_step=trainer.global_step,
        )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))


def run_cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    result = subprocess.run(
        [sys.executable, "-m", "ldm_lightning.train", *args, f"paths.log_dir={tmp_path}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def autoencoder_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("ae")
    train(compose_config(["+experiment=shapes_vq", *TINY_AUTOENCODER, "test=false"], run))
    return run / "checkpoints" / "last.ckpt"


def test_two_process_cpu_ddp_keeps_ranks_identical(autoencoder_ckpt: Path, tmp_path: Path) -> None:
    run_dir, probe_dir = tmp_path / "run", tmp_path / "probe"
    run_cli(
        [
            "+experiment=shapes_ldm",
            *TINY_LDM,
            f"model.first_stage.ckpt_path={autoencoder_ckpt}",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.precision=32-true",
            "trainer.sync_batchnorm=false",
            "+trainer.limit_val_batches=1",
            "matmul_precision=null",
            "test=false",
            f"paths.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={run_dir}",
            "+callbacks.rank_probe._target_=tests.test_scale_ddp.RankProbe",
            f"+callbacks.rank_probe.out_dir={probe_dir}",
        ],
        tmp_path,
    )
    ranks = [json.loads((probe_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    # 16 training images, batch 4, split over 2 ranks: 2 optimizer steps per rank.
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["global_step"] for r in ranks] == [2, 2]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["scale_factor"] == ranks[1]["scale_factor"]
    assert ranks[0]["train_latents"] == ranks[1]["train_latents"]
    # seed_everything(42) on both ranks; the noise generators are 42 + rank.
    assert [r["noise_seed"] for r in ranks] == [42, 43]
    assert ranks[0]["first_timesteps"] != ranks[1]["first_timesteps"]

    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert len(checkpoints) == 2 and "last.ckpt" in checkpoints  # the best one and last.ckpt
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 2 and saved["scale_factor"] == ranks[0]["scale_factor"]


def test_multirun_gives_each_job_its_own_directory(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    run_cli(
        [
            "-m",
            "+experiment=shapes_vq",
            *TINY_AUTOENCODER,
            "+trainer.limit_val_batches=1",
            "test=false",
            "seed=1,2",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
    )
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert jobs == ["0", "1"]
    for job, seed in zip(jobs, ("1", "2")):
        overrides = (sweep / job / ".hydra" / "overrides.yaml").read_text()
        assert f"seed={seed}" in overrides
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
    assert (sweep / "multirun.yaml").is_file()
