"""`python -m ldm_lightning.evaluate` on tiny shapes checkpoints, with a small feature extractor."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf, open_dict
from torch import nn

from ldm_lightning.evaluate import data_config, evaluate
from ldm_lightning.metrics.evaluation import format_table
from ldm_lightning.metrics.fid import extract, frechet_distance, gaussian_statistics
from ldm_lightning.models import AutoencoderModule, LatentDiffusionModule
from ldm_lightning.models.checkpoints import load_stage
from ldm_lightning.train import train
from tests.hydra_utils import TINY_AUTOENCODER, compose_config

REPO = Path(__file__).parents[1]
EXTRACTOR = "tests.test_evaluate.TinyFeatures"
TINY_DATA = ["data.image_size=16", "data.batch_size=4", "data.num_train=16", "data.num_val=8",
             "data.num_test=8"]


class TinyFeatures(nn.Module):
    """A fixed random 4x4-patch embedding (16-D), tanh, mean-pooled: an offline stand-in."""

    num_features = 16

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 4, 4)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator) * 0.3)
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x * 2 - 1)).mean((2, 3))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A tiny VQ autoencoder and a tiny LDM on its latents (16 px shapes), trained once."""
    root = tmp_path_factory.mktemp("runs")
    train(compose_config(["+experiment=shapes_vq", *TINY_AUTOENCODER, "test=false"], root / "ae"))
    ae = root / "ae" / "checkpoints" / "last.ckpt"
    train(compose_config([
        "+experiment=shapes_ldm", *TINY_DATA, "model.unet.model_channels=16",
        "model.unet.channel_mult=[1,2]", "model.unet.attention_resolutions=[2]",
        "model.unet.num_head_channels=8", "model.sampling.steps=4", "model.num_log_images=4",
        "trainer.max_epochs=1", "test=false", f"model.first_stage.ckpt_path={ae}",
    ], root / "ldm"))
    return {"ae": ae, "ldm": root / "ldm" / "checkpoints" / "last.ckpt"}


def run_images(ckpt: Path, split: str) -> torch.Tensor:
    """All images ``[N, 3, H, W]`` of ``split`` of the data the checkpoint's run trained on."""
    datamodule = hydra.utils.instantiate(OmegaConf.load(ckpt.parents[1] / "config.yaml").data)
    return torch.stack([item["image"] for item in datamodule.build_split(split)])


def eval_config(tmp_path: Path, ckpt: Path, *overrides: str):
    cfg = compose_config(
        [f"ckpt_path={ckpt}", f"feature_extractor={EXTRACTOR}", "progress=false", *overrides],
        tmp_path, config_name="evaluate",
    )
    with open_dict(cfg):
        cfg.stats_dir = str(tmp_path / "stats")
    return cfg


def test_ldm_fid_equals_the_scipy_fid_of_the_same_samples(checkpoints, tmp_path) -> None:
    cfg = eval_config(tmp_path, checkpoints["ldm"], "protocol.num_samples=20", "batch_size=8",
                      "protocol.metrics=[fid,kid]", "protocol.kid_subset_size=8")
    report = evaluate(cfg)
    assert json.loads((tmp_path / "metrics.json").read_text()) == report
    assert (tmp_path / "samples.png").is_file()
    assert report["kind"] == "latent_diffusion" and report["dataset"] == "shapes"
    assert report["num_samples"] == 20 and "linear in 1/N" in report["warning"]
    assert report["data_config"].endswith("config.yaml")  # the run's data: 16 train images
    assert report["metrics"]["num_real"] == 16 and report["metrics"]["split"] == "train"
    assert report["sampling"]["steps"] == 4 and report["sampling"]["sampler"] == "ddim"

    # The same samples by hand: batches of 8, 8, 4 with seeds 0, 1, 2.
    module = load_stage(LatentDiffusionModule, checkpoints["ldm"], "latent_diffusion")
    extractor = TinyFeatures()
    fake = torch.cat([module.sample(n=n, seed=s) for s, n in enumerate([8, 8, 4])])
    real = run_images(checkpoints["ldm"], "train")
    expected = frechet_distance(*gaussian_statistics(extract(extractor, real)[0].numpy()),
                                *gaussian_statistics(extract(extractor, fake)[0].numpy()))
    assert report["metrics"]["fid"] == pytest.approx(expected, rel=1e-3)
    assert math.isfinite(report["metrics"]["kid_mean"])


def test_the_report_names_a_sampler_given_as_a_target_dict(checkpoints, tmp_path) -> None:
    ddpm = "ldm_lightning.diffusion.samplers.DDPMSampler"
    cfg = eval_config(tmp_path, checkpoints["ldm"], "protocol.num_samples=2", "batch_size=2",
                      "steps=2",
                      f"sampler={{_target_:{ddpm},variance:fixed_large}}")
    sampling = evaluate(cfg)["sampling"]
    assert sampling["sampler"] == "ddpm"
    assert sampling["sampler_config"] == {"_target_": ddpm, "variance": "fixed_large"}


def test_autoencoder_reports_rfid_psnr_ssim_lpips_and_codebook_usage(checkpoints, tmp_path):
    cfg = eval_config(tmp_path, checkpoints["ae"], "lpips.net=vgg",
                      "lpips.pretrained_backbone=false", "batch_size=4")
    report = evaluate(cfg)
    metrics = report["metrics"]
    assert report["kind"] == "autoencoder" and metrics["split"] == "val"
    assert report["num_samples"] == metrics["num_images"] == 8
    module = load_stage(AutoencoderModule, checkpoints["ae"], "autoencoder")
    real = run_images(checkpoints["ae"], "val")
    with torch.no_grad():
        x_hat, _, info = module(real, sample_posterior=False)
    mse = (((x_hat.clamp(-1, 1) + 1) / 2 - (real + 1) / 2) ** 2).mean()
    assert metrics["psnr"] == pytest.approx(float(10 * torch.log10(1 / mse)), rel=1e-4)
    used = torch.unique(info["indices"]).numel() / module.quantize.n_embed
    assert metrics["codebook_usage"] == pytest.approx(used)
    assert 0 < metrics["ssim"] <= 1 and metrics["lpips"] >= 0 and metrics["rfid"] >= 0


def test_hydra_entry_point_writes_metrics_json(checkpoints, tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "ldm_lightning.evaluate", f"ckpt_path={checkpoints['ldm']}",
        f"feature_extractor={EXTRACTOR}", "protocol.num_samples=12", "batch_size=6",
        "progress=false",
        f"paths.log_dir={tmp_path / 'logs'}", f"paths.cache_dir={tmp_path / 'cache'}",
        "data.num_train=12",  # applied on top of the run's data config
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = (tmp_path / "logs" / "evaluate" / "runs").glob("*/metrics.json")
    report = json.loads(path.read_text())
    assert report["num_samples"] == 12 and report["metrics"]["num_real"] == 12
    assert report["metrics"]["fid"] >= 0
    assert "fid" in result.stdout and "12 samples" in result.stdout
    assert list((tmp_path / "cache" / "fid").glob("shapes-train-16px-*.pt"))


def test_data_config_follows_the_run_unless_overridden(checkpoints, tmp_path) -> None:
    cfg = eval_config(tmp_path, checkpoints["ldm"])
    data, source = data_config(cfg, checkpoints["ldm"], ["data.num_val=3"])
    assert source.endswith("config.yaml")
    assert data.image_size == 16 and data.num_train == 16 and data.num_val == 3
    data, source = data_config(cfg, checkpoints["ldm"], ["data=shapes"])
    assert data.image_size == 32 and source == "the data= override"


def test_data_overrides_follow_hydras_grammar(checkpoints, tmp_path) -> None:
    cfg = eval_config(tmp_path, checkpoints["ldm"])
    overrides = ["++data.num_val=5", "~data.num_test", "data.seed='7'", "ckpt_path=x.ckpt"]
    data, _ = data_config(cfg, checkpoints["ldm"], overrides)
    assert data.num_val == 5 and "num_test" not in data and data.seed == "7"
    assert data.num_train == 16  # the run's value, untouched


def test_resolution_must_match_the_checkpoint(checkpoints, tmp_path) -> None:
    cfg = eval_config(tmp_path, checkpoints["ldm"], "protocol.num_samples=4")
    with pytest.raises(ValueError, match="trained on 16 px images, but data.image_size=32"):
        evaluate(cfg, ["data=shapes"])


def test_missing_and_corrupt_checkpoints_give_clear_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate(eval_config(tmp_path, tmp_path / "nope.ckpt"))
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        evaluate(eval_config(tmp_path, corrupt))


def test_unknown_metric_is_an_error(checkpoints, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"unknown \['fd'\]"):
        evaluate(eval_config(tmp_path, checkpoints["ldm"], "protocol.metrics=[fd]"))


def test_format_table_aligns_names_and_values() -> None:
    table = format_table({"fid": 12.34567, "num_generated": 10})
    assert table.splitlines()[1:3] == ["fid            12.3457", "num_generated  10"]
