"""Scale and speed switches: device configs, launchers, sweeps, bf16, compile, clipping."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import hydra
import pytest
import pytorch_lightning as pl
import submitit
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
from lightning_fabric.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import CategoricalDistribution, LogUniformDistribution

from ldm_lightning.models.speed import compile_options, rank_generator
from ldm_lightning.train import train
from ldm_lightning.utils.checkpoint_io import AtomicCheckpointIO
from ldm_lightning.utils.wandb import slurm_run_id, wandb_logger
from tests.hydra_utils import TINY_AUTOENCODER, compose_config
from tests.models.test_diffusion_module import TINY_LDM

# One training step of a pixel-space (identity first stage) tiny LDM, no validation.
ONE_LDM_STEP = [
    "+experiment=shapes_ldm",
    *TINY_LDM,
    "model.first_stage.identity=true",
    "data.cache_latents=false",
    "callbacks=none",
    "+callbacks.probe._target_=tests.test_scale.StepProbe",
    "+trainer.limit_train_batches=1",
    "+trainer.limit_val_batches=0",
    "test=false",
]
ONE_AE_STEP = [
    "+experiment=shapes_vq",
    *TINY_AUTOENCODER,
    "model.loss.disc_start=0",  # the discriminator and the adaptive weight run in step 1
    "callbacks=none",
    "+callbacks.probe._target_=tests.test_scale.StepProbe",
    "+trainer.limit_train_batches=1",
    "+trainer.limit_val_batches=0",
    "test=false",
]


class StepProbe(pl.Callback):
    """Records dtypes, gradient norms and the compiled nets of a run (class-level, in-process)."""

    last: dict[str, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record: dict[str, Any] = {"out_dtypes": [], "grad_norms": [], "module": pl_module}
        StepProbe.last = record
        net = pl_module.unet if hasattr(pl_module, "unet") else pl_module.decoder
        net.register_forward_hook(lambda m, i, out: record["out_dtypes"].append(out.dtype))

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        norms = torch.stack([g.norm() for g in grads if g is not None])
        StepProbe.last["grad_norms"].append(norms.norm().item())


def compose_with_hydra(overrides: list[str]) -> DictConfig:
    """The full config, ``hydra`` node included (launcher, sweeper), as the CLI composes it."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="conf", version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


# ---------------------------------------------------------------- device configs
def test_gpu_trainer_is_bf16_mixed_with_tf32_matmuls(tmp_path: Path) -> None:
    cfg = compose_config(["+experiment=shapes_ldm", "trainer=gpu"], tmp_path)
    assert (cfg.trainer.accelerator, cfg.trainer.precision) == ("gpu", "bf16-mixed")
    assert cfg.matmul_precision == "high"
    cpu = compose_config(["+experiment=shapes_ldm"], tmp_path)
    assert cpu.matmul_precision is None
    assert cfg.trainer.max_epochs == cpu.trainer.max_epochs  # the experiment still overrides


def test_ddp_and_multinode_trainers(tmp_path: Path) -> None:
    ddp = compose_config(["trainer=ddp", "trainer.devices=4"], tmp_path).trainer
    assert (ddp.strategy, ddp.devices, ddp.precision) == ("ddp", 4, "bf16-mixed")
    assert ddp.use_distributed_sampler
    cfg = compose_config(["trainer=multinode", "trainer.num_nodes=3"], tmp_path)
    assert (cfg.trainer.num_nodes, cfg.trainer.strategy, cfg.matmul_precision) == (3, "ddp", "high")
    environment, checkpoint_io = hydra.utils.instantiate(cfg.trainer.plugins)
    assert isinstance(checkpoint_io, AtomicCheckpointIO)
    assert isinstance(environment, SLURMEnvironment)
    assert environment.auto_requeue and environment.requeue_signal == signal.SIGUSR1


# ---------------------------------------------------------------- launchers and sweepers
def test_submitit_slurm_launcher_writes_the_expected_sbatch_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = compose_with_hydra(
        [
            "hydra/launcher=submitit_slurm",
            "+experiment=shapes_ldm",
            "trainer=multinode",
            "trainer.num_nodes=2",
            "trainer.devices=4",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.account=my_project",
            "hydra.launcher.timeout_min=1440",
            f"hydra.sweep.dir={tmp_path}",
        ]
    )
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    # submitit looks for srun before it builds a SLURM executor: a stand-in on PATH.
    srun = tmp_path / "bin" / "srun"
    srun.parent.mkdir()
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{srun.parent}:{os.environ['PATH']}")
    submitted: list[submitit.AutoExecutor] = []
    # Capture the executor the launcher builds instead of calling sbatch.
    monkeypatch.setattr(
        submitit.AutoExecutor, "map_array", lambda self, *a: submitted.append(self) or []
    )
    assert launcher.launch([["seed=1"], ["seed=2"]], initial_job_idx=0) == []
    script = submitted[0]._executor._make_submission_file_text("python -m job", "uid")
    sbatch = {line for line in script.splitlines() if line.startswith("#SBATCH")}
    expected = {
        "--nodes=2",
        "--ntasks-per-node=4",  # one Lightning process per GPU
        "--gpus-per-node=4",
        "--time=1440",
        "--partition=gpu",
        "--account=my_project",
        "--signal=USR1@120",  # Lightning's requeue signal, 2 minutes before the limit
        "--requeue",
        "--job-name=shapes_ldm",
    }
    assert {f"#SBATCH {flag}" for flag in expected} <= sbatch
    assert "srun" in script and str(tmp_path / ".submitit") in script


def test_submitit_local_launcher_composes(tmp_path: Path) -> None:
    cfg = compose_with_hydra(["hydra/launcher=submitit_local", f"hydra.sweep.dir={tmp_path}"])
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "LocalLauncher"
    assert launcher.params["tasks_per_node"] == 1 and launcher.params["timeout_min"] == 240


def test_optuna_search_space_parses_into_optuna_distributions() -> None:
    cfg = compose_with_hydra(["hparams_search=optuna", "+experiment=shapes_ldm"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
    assert sweeper.study_name == "shapes_ldm" and cfg.optimized_metric == "val/loss"
    overrides = [f"{k}={v}" for k, v in sweeper.params.items()]
    space, fixed = create_params_from_overrides(overrides)
    assert fixed == {}
    assert space["model.optimizer.base_lr"] == LogUniformDistribution(1e-4, 3e-3)
    assert space["data.batch_size"] == CategoricalDistribution((16, 32, 64))


# ---------------------------------------------------------------- speed switches
def test_bf16_autocast_on_cpu_runs_the_diffusion_step(tmp_path: Path) -> None:
    train(compose_config([*ONE_LDM_STEP, "trainer.precision=bf16-mixed"], tmp_path))
    probe = StepProbe.last
    assert probe["out_dtypes"] == [torch.bfloat16]  # the UNet ran under autocast
    assert torch.isfinite(torch.tensor(probe["grad_norms"])).all()
    assert {p.dtype for p in probe["module"].parameters()} == {torch.float32}  # fp32 master


def test_bf16_autocast_on_cpu_runs_the_manual_gan_step(tmp_path: Path) -> None:
    train(compose_config([*ONE_AE_STEP, "trainer.precision=bf16-mixed"], tmp_path))
    probe = StepProbe.last
    assert torch.bfloat16 in probe["out_dtypes"]
    assert len(probe["grad_norms"]) == 2  # generator and discriminator both stepped
    assert torch.isfinite(torch.tensor(probe["grad_norms"])).all()


def test_compiled_unet_keeps_parameter_names_and_outputs(tmp_path: Path) -> None:
    # aot_eager traces and differentiates the graph like inductor, without a C++ compile.
    train(compose_config([*ONE_LDM_STEP, "model.compile={backend:aot_eager}"], tmp_path))
    module = StepProbe.last["module"]
    eager = hydra.utils.instantiate(
        compose_config([*ONE_LDM_STEP], tmp_path / "eager").model
    ).unet
    assert module.unet._compiled_call_impl is not None and eager._compiled_call_impl is None
    assert list(module.unet.state_dict()) == list(eager.state_dict())
    eager.load_state_dict(module.unet.state_dict())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    torch.testing.assert_close(module.unet(x, t), eager(x, t))
    assert not any("_orig_mod" in key for key in module.state_dict())  # what checkpoints save


@pytest.mark.slow
def test_inductor_compile_runs_a_training_step(tmp_path: Path) -> None:
    """The real ``model.compile=true`` (inductor, C++); minutes on a cold compile cache."""
    train(compose_config([*ONE_LDM_STEP, "model.compile=true"], tmp_path))
    assert StepProbe.last["module"].unet._compiled_call_impl is not None
    assert torch.isfinite(torch.tensor(StepProbe.last["grad_norms"])).all()


def test_compiled_autoencoder_runs_the_gan_step(tmp_path: Path) -> None:
    train(compose_config([*ONE_AE_STEP, "model.compile={backend:aot_eager}"], tmp_path))
    module = StepProbe.last["module"]
    assert module.encoder._compiled_call_impl is not None
    assert module.decoder._compiled_call_impl is not None
    assert len(StepProbe.last["grad_norms"]) == 2


def test_compile_switch_rejects_other_values() -> None:
    assert compile_options(False) is None and compile_options(True) == {}
    assert compile_options({"mode": "max-autotune"}) == {"mode": "max-autotune"}
    with pytest.raises(ValueError, match="neither a bool nor a dict"):
        compile_options("yes")


def test_channels_last_stores_weights_and_inputs_in_nhwc(tmp_path: Path) -> None:
    train(compose_config([*ONE_LDM_STEP, "model.channels_last=true"], tmp_path))
    conv = StepProbe.last["module"].unet.input_blocks[0][0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()


def test_autoencoder_gradient_clipping_bounds_each_optimizers_norm(tmp_path: Path) -> None:
    train(compose_config([*ONE_AE_STEP], tmp_path / "free"))
    free = StepProbe.last["grad_norms"]
    assert min(free) > 1e-2
    train(compose_config([*ONE_AE_STEP, "model.gradient_clip_val=1e-2"], tmp_path / "clip"))
    clipped = StepProbe.last["grad_norms"]
    assert clipped == pytest.approx([1e-2, 1e-2], rel=1e-3)


def test_trainer_gradient_clipping_is_refused_for_the_autoencoder(tmp_path: Path) -> None:
    cfg = compose_config([*ONE_AE_STEP, "trainer.gradient_clip_val=1.0"], tmp_path)
    with pytest.raises(Exception, match="gradient clipping is not supported for manual"):
        train(cfg)


def test_gradient_accumulation_and_lr_scaling_for_the_diffusion_model(tmp_path: Path) -> None:
    cfg = compose_config(
        [
            *ONE_LDM_STEP,
            "trainer.accumulate_grad_batches=2",
            "++trainer.limit_train_batches=2",
            "model.optimizer.base_lr=1e-5",
            "model.optimizer.scale_lr=true",
            "model.optimizer.warmup_steps=0",
        ],
        tmp_path,
    )
    train(cfg)
    module = StepProbe.last["module"]
    # Two batches, one optimizer step; lr = base_lr * batch 4 * 1 device * 1 node * 2 batches.
    assert len(StepProbe.last["grad_norms"]) == 1
    assert module.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-5 * 4 * 2)


def test_rank_generators_differ_by_rank() -> None:
    class Rank:
        device = torch.device("cpu")

        def __init__(self, rank: int) -> None:
            self.global_rank = rank

    torch.manual_seed(42)
    draws = [torch.randn(4, generator=rank_generator(Rank(r))) for r in (0, 1)]
    assert [rank_generator(Rank(r)).initial_seed() for r in (0, 1)] == [42, 43]
    assert not torch.equal(draws[0], draws[1])
    expected = torch.randn(4, generator=torch.Generator().manual_seed(43))
    torch.testing.assert_close(draws[1], expected)


# ---------------------------------------------------------------- wandb ids under SLURM
def slurm_env(monkeypatch: pytest.MonkeyPatch, **extra: str) -> None:
    for key in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(key, raising=False)
    env = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242", **extra}
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_wandb_run_id_follows_the_slurm_job(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    assert slurm_run_id("shapes_ldm") is None  # off SLURM: wandb picks an id
    slurm_env(monkeypatch)
    assert slurm_run_id("shapes_ldm") == "shapes_ldm-4242"
    slurm_env(monkeypatch, SLURM_ARRAY_JOB_ID="77", SLURM_ARRAY_TASK_ID="3")
    assert slurm_run_id("shapes_ldm") == "shapes_ldm-77_3"
    logger = wandb_logger(str(tmp_path), "shapes_ldm", offline=True)
    assert logger._wandb_init["id"] == "shapes_ldm-77_3"
    assert logger._wandb_init["resume"] == "allow"
    explicit = wandb_logger(str(tmp_path), "shapes_ldm", offline=True, id="mine")
    assert explicit._wandb_init["id"] == "mine"
    monkeypatch.setenv("SLURM_JOB_NAME", "bash")  # an interactive allocation: not requeued
    assert slurm_run_id("shapes_ldm") is None


def test_slurm_launcher_follows_a_single_device_trainer(tmp_path: Path) -> None:
    cfg = compose_with_hydra(["hydra/launcher=submitit_slurm", f"hydra.sweep.dir={tmp_path}"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    # trainer=cpu: one node, one task; the GPU count follows trainer.devices.
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (1, 1, 1)
