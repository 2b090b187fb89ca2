"""LatentDiffusionModule: start-up checks, loss, latent normalisation, cache, EMA, checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ldm_lightning.data.latent_dataset import LatentDataset
from ldm_lightning.data.shapes import ShapesDataModule
from ldm_lightning.diffusion import Sampler
from ldm_lightning.diffusion.latent_norm import LatentStats
from ldm_lightning.models import AutoencoderModule, LatentDiffusionModule, connect
from ldm_lightning.models.checkpoints import load_stage
from ldm_lightning.train import train
from tests.diffusion.test_user_sampler import euler_sampler  # noqa: F401 - a fixture
from tests.hydra_utils import TINY_AUTOENCODER, compose_config
from tests.nn.test_unet import _randomise as randomise_zero_parameters

TINY_UNET = {
    "model_channels": 16,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "attention_resolutions": [2],
    "num_head_channels": 8,
}
TINY_LDM = [
    "data.image_size=16",
    "data.batch_size=4",
    "data.num_train=16",
    "data.num_val=8",
    "data.num_test=8",
    "model.unet.model_channels=16",
    "model.unet.channel_mult=[1,2]",
    "model.unet.attention_resolutions=[2]",
    "model.unet.num_head_channels=8",
    "model.sampling.steps=4",
    "model.num_log_images=4",
    "trainer.max_epochs=1",
    "logger=csv",
]


@pytest.fixture(scope="module")
def autoencoder_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("ae")
    train(compose_config(["+experiment=shapes_vq", *TINY_AUTOENCODER, "test=false"], run))
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def ldm_run(autoencoder_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("ldm")
    train(
        compose_config(
            [
                "+experiment=shapes_ldm",
                *TINY_LDM,
                f"model.first_stage.ckpt_path={autoencoder_ckpt}",
            ],
            run,
        )
    )
    return run


def tiny_pixel_ddpm(**overrides) -> LatentDiffusionModule:
    kwargs = dict(
        unet=TINY_UNET,
        first_stage={"identity": True},
        image_size=16,
        schedule={"kind": "linear", "timesteps": 100},
        scale_factor=1.0,
    )
    return LatentDiffusionModule(**{**kwargs, **overrides})


def test_negative_offset_noise_is_refused() -> None:
    with pytest.raises(ValueError, match=r"model.offset_noise must be >= 0 \(0: off\), got -0.1"):
        tiny_pixel_ddpm(offset_noise=-0.1)


def test_unet_channels_that_do_not_match_the_latents_fail_at_start(autoencoder_ckpt: Path) -> None:
    with pytest.raises(
        ValueError, match=r"latents with 3 channels, but model.unet has in_channels=4"
    ):
        LatentDiffusionModule(
            unet={**TINY_UNET, "in_channels": 4},
            first_stage={"ckpt_path": str(autoencoder_ckpt)},
            image_size=16,
        )


def test_missing_or_wrong_first_stage_is_a_clear_error(tmp_path: Path, ldm_run: Path) -> None:
    with pytest.raises(ValueError, match="model.first_stage.ckpt_path is not set"):
        LatentDiffusionModule(unet=TINY_UNET, first_stage={}, image_size=16)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LatentDiffusionModule(unet=TINY_UNET, first_stage={"ckpt_path": str(tmp_path / "x.ckpt")})
    ldm_ckpt = ldm_run / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match="is a latent_diffusion checkpoint, but an autoencoder"):
        LatentDiffusionModule(unet=TINY_UNET, first_stage={"ckpt_path": str(ldm_ckpt)})


def test_unknown_prediction_and_sampler_list_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"valid: \('eps', 'v', 'x0'\)"):
        tiny_pixel_ddpm(prediction="noise")
    with pytest.raises(ValueError, match="ddpm"):
        tiny_pixel_ddpm().sample(n=1, sampler="lms", steps=2)


DDIM = "ldm_lightning.diffusion.samplers.DDIMSampler"


def test_model_sampling_names_a_sampler_of_ones_own_by_target(
    euler_sampler: type[Sampler],  # noqa: F811 - the fixture
) -> None:
    torch.manual_seed(0)
    target = f"{euler_sampler.__module__}.EulerX0Sampler"  # a test module's, imported
    ldm = tiny_pixel_ddpm(sampling={"sampler": {"_target_": target}, "steps": 3})
    randomise_zero_parameters(ldm.unet)  # else the UNet predicts 0 whatever the sampler
    images = ldm.sample(n=2, seed=0)
    torch.testing.assert_close(images, ldm.sample(n=2, seed=0, sampler="ddim"))  # the same ODE
    assert not torch.allclose(images, ldm.sample(n=2, seed=0, sampler="ddpm"))
    assert torch.equal(ldm.sample(n=2, seed=0, sampler=euler_sampler.name), images)


def test_a_sampler_dicts_eta_replaces_the_saved_one_and_a_given_eta_both() -> None:
    ldm = tiny_pixel_ddpm(sampling={"sampler": {"_target_": DDIM, "eta": 1.0}, "eta": 0.0})
    assert ldm.sampling_settings()["eta"] == 1.0
    settings = ldm.sampling_settings(eta=0.5)
    assert settings["eta"] == settings["sampler"]["eta"] == 0.5
    # A Hydra config from the command line comes back a plain dict (metrics.json stores it).
    given = ldm.sampling_settings(sampler=OmegaConf.create({"_target_": DDIM}))
    assert type(given["sampler"]) is dict and given["eta"] == 0.0


@pytest.mark.parametrize("target", ["os.system", "torch.nn.Linear"])
def test_a_sampler_target_that_is_not_a_sampler_is_refused(target: str) -> None:
    ldm = tiny_pixel_ddpm(sampling={"sampler": {"_target_": target}})
    with pytest.raises(ValueError, match="is not a sampler class.*choose one of: ddpm, ddim"):
        ldm.sample(n=1, steps=2)
    with pytest.raises(ValueError, match="is not a sampler class"):
        ldm.on_fit_start()  # before training, not at the first validation samples


def test_latents_not_divisible_by_the_unet_fail_at_start() -> None:
    with pytest.raises(ValueError, match=r"latents are 6x6 .* not divisible by the UNet's"):
        tiny_pixel_ddpm(image_size=6, unet={**TINY_UNET, "channel_mult": [1, 2, 2]})


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_diffusion_loss_equals_the_closed_form(prediction: str) -> None:
    model = tiny_pixel_ddpm(prediction=prediction)
    z0 = torch.randn(3, 3, 16, 16)
    loss = model.diffusion_loss(z0, {}, torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(7)
    t = torch.randint(0, 100, (3,), generator=generator)
    noise = torch.randn(z0.shape, generator=generator)
    abar = model.process.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    z_t = abar.sqrt() * z0 + (1 - abar).sqrt() * noise  # DDPM eq. 4
    target = {"eps": noise, "x0": z0, "v": abar.sqrt() * noise - (1 - abar).sqrt() * z0}[prediction]
    expected = F.mse_loss(model.unet(z_t, t), target)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_training_lowers_the_loss_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    model = tiny_pixel_ddpm()
    z0 = torch.rand(8, 3, 16, 16) * 2 - 1
    optimizer = torch.optim.Adam(model.unet.parameters(), lr=2e-3)

    def fixed_loss() -> torch.Tensor:
        return model.diffusion_loss(z0, {}, torch.Generator().manual_seed(0))

    with torch.no_grad():
        before = fixed_loss()
    for step in range(60):
        loss = model.diffusion_loss(z0, {}, torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        assert fixed_loss() < 0.6 * before


def test_identity_first_stage_is_pixel_space() -> None:
    model = tiny_pixel_ddpm()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(model.latents({"image": x}), x)
    images = model.sample(n=2, steps=3)
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1


def test_run_estimates_and_stores_the_scale_factor(ldm_run: Path, autoencoder_ckpt: Path) -> None:
    checkpoint = torch.load(ldm_run / "checkpoints" / "last.ckpt", weights_only=False)
    data = ShapesDataModule(image_size=16, batch_size=4, num_train=16, num_val=8, num_test=8)
    ae = load_stage(AutoencoderModule, autoencoder_ckpt, "autoencoder")
    # One epoch of 16 images in batches of 4: the estimate saw every training image once.
    images = torch.stack([data.dataset("train")[i]["image"] for i in range(16)])
    expected = 1.0 / ae.encode(images).double().std(unbiased=False).item()
    assert checkpoint["scale_factor"] == pytest.approx(expected, rel=1e-4)
    assert checkpoint["hyper_parameters"]["first_stage"]["sha256"]
    assert "current_model_state" in checkpoint, "EMA weights are the checkpoint's state_dict"


def test_a_checkpoint_alone_is_enough_to_sample(ldm_run: Path, tmp_path: Path) -> None:
    ckpt = ldm_run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=False)
    checkpoint["hyper_parameters"]["first_stage"]["ckpt_path"] = str(tmp_path / "gone.ckpt")
    moved = tmp_path / "moved.ckpt"
    torch.save(checkpoint, moved)
    model = load_stage(LatentDiffusionModule, moved, "latent_diffusion")
    a = model.sample(n=2, steps=3, seed=1)
    b = model.sample(n=2, steps=3, seed=1)
    c = model.sample(n=2, steps=3, seed=2)
    assert a.shape == (2, 3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    reference = load_stage(LatentDiffusionModule, ckpt, "latent_diffusion")
    torch.testing.assert_close(reference.sample(n=2, steps=3, seed=1), a)


def test_run_trains_from_the_latent_cache_and_logs_images(ldm_run: Path) -> None:
    caches = sorted(p.parent.name for p in ldm_run.rglob("shapes-*/manifest.json"))
    assert [name.split("-")[1] for name in caches] == ["test", "train", "val"]
    assert list((ldm_run / "images").glob("samples_epoch000_*.png"))
    assert list((ldm_run / "images").glob("trajectory_epoch000_*.png"))


def test_datamodule_serves_cached_latents_equal_to_encoding(
    autoencoder_ckpt: Path, tmp_path: Path
) -> None:
    model = LatentDiffusionModule(
        unet=TINY_UNET,
        first_stage={"ckpt_path": str(autoencoder_ckpt)},
        image_size=16,
        scale_factor=1.0,
        num_log_images=2,
    )
    data = ShapesDataModule(
        image_size=16,
        batch_size=4,
        num_train=8,
        num_val=4,
        num_test=4,
        cache_latents=True,
        cache_dir=str(tmp_path / "cache"),
    )
    connect(model, data)
    pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).validate(model, data)
    cached = data.dataset("val")
    assert isinstance(cached, LatentDataset)
    images = torch.stack([data.build_split("val", augment=False)[i]["image"] for i in range(4)])
    torch.testing.assert_close(
        torch.stack([cached[i]["latent"] for i in range(4)]), model.latent_encoder().encode(images)
    )


def train_channel_ldm(tmp_path: Path) -> tuple[LatentDiffusionModule, pl.Trainer, Path]:
    """A pixel-space LDM with ``latent_norm="channel"`` trained 2 steps on 8 shapes (the fit
    estimates the mean and std from 2 batches of 4: every training image), one validation
    batch, saved to ``tmp_path/channel.ckpt``."""
    torch.manual_seed(0)
    model = tiny_pixel_ddpm(
        latent_norm="channel", scale_factor=None, scale_factor_batches=2,
        sampling={"steps": 2}, num_log_images=2,
    )
    data = ShapesDataModule(image_size=16, batch_size=4, num_train=8, num_val=4, num_test=4)
    connect(model, data)
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, max_steps=2, limit_val_batches=1, num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, data)
    path = tmp_path / "channel.ckpt"
    trainer.save_checkpoint(path)
    return model, trainer, path


def test_unknown_latent_norm_and_a_fixed_scale_in_channel_mode_are_refused() -> None:
    with pytest.raises(ValueError, match=r"latent_norm='pixel' is unknown; valid: \('scalar'"):
        tiny_pixel_ddpm(latent_norm="pixel")
    with pytest.raises(ValueError, match=r"scale_factor=1.0 .*model.scale_factor=null"):
        tiny_pixel_ddpm(latent_norm="channel")  # tiny_pixel_ddpm fixes scale_factor=1.0


def test_channel_latent_norm_trains_saves_and_loads(tmp_path: Path) -> None:
    model, trainer, path = train_channel_ldm(tmp_path)
    images = torch.stack([item["image"] for item in ShapesDataModule(
        image_size=16, num_train=8, num_val=4, num_test=4).dataset("train")])
    expected = LatentStats.of([images])  # identity first stage: the latents are the pixels
    norm = model.latent_norm
    assert norm.mode == "channel" and model.scale_factor is None
    torch.testing.assert_close(torch.tensor(norm.mean, dtype=torch.float64), expected.mean())
    torch.testing.assert_close(torch.tensor(norm.std, dtype=torch.float64), expected.std())
    metrics = trainer.callback_metrics  # validation logs the per-channel statistics
    assert metrics["latent_std/2"].item() == pytest.approx(norm.std[2], rel=1e-6)
    assert "scale_factor" not in metrics

    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["latent_norm"] == "channel" and checkpoint["scale_factor"] is None
    assert checkpoint["latent_mean"] == norm.mean and checkpoint["latent_std"] == norm.std
    loaded = LatentDiffusionModule.load_from_checkpoint(path)
    assert loaded.latent_norm.state() == norm.state()
    samples = loaded.sample(n=2, seed=0)
    assert samples.shape == (2, 3, 16, 16) and samples.abs().max() <= 1
    torch.testing.assert_close(samples, model.eval().sample(n=2, seed=0))
    # What the weights were trained on wins over a mode asked for at load time.
    asked_scalar = LatentDiffusionModule.load_from_checkpoint(path, latent_norm="scalar")
    assert asked_scalar.latent_norm.state() == norm.state()


def test_a_checkpoint_from_before_the_channel_mode_loads_as_scalar(tmp_path: Path) -> None:
    _, _, path = train_channel_ldm(tmp_path)
    old = torch.load(path, weights_only=True)
    for key in ("latent_norm", "latent_mean", "latent_std"):
        del old[key]
    del old["hyper_parameters"]["latent_norm"]
    old["scale_factor"] = 0.5
    torch.save(old, tmp_path / "old.ckpt")
    loaded = LatentDiffusionModule.load_from_checkpoint(tmp_path / "old.ckpt")
    assert loaded.latent_norm.mode == "scalar" and loaded.scale_factor == 0.5
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(loaded.latents({"image": x}), x * 0.5)


def test_model_latent_norm_channel_through_the_configs(tmp_path: Path) -> None:
    """``model.latent_norm=channel`` on the command line: a pixel-space run of 2 steps."""
    overrides = [
        "+experiment=shapes_ldm", *TINY_LDM, "model.first_stage.identity=true",
        "data.cache_latents=false", "model.latent_norm=channel",
        "model.scale_factor_batches=4",  # 4 batches of 4: all 16 training images
        "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "test=false",
        "model.sampling.steps=2", "model.num_log_images=2",
    ]
    train(compose_config(overrides, tmp_path))
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["latent_norm"] == "channel"
    data = ShapesDataModule(image_size=16, batch_size=4, num_train=16, num_val=8, num_test=8)
    images = torch.stack([data.dataset("train")[i]["image"] for i in range(16)])
    expected = LatentStats.of([images])
    assert checkpoint["latent_norm"] == "channel" and checkpoint["scale_factor"] is None
    assert checkpoint["latent_mean"] == pytest.approx(expected.mean().tolist(), rel=1e-6)
    assert checkpoint["latent_std"] == pytest.approx(expected.std().tolist(), rel=1e-6)
    model = LatentDiffusionModule.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert model.latent_norm.std == checkpoint["latent_std"]
    assert model.sample(n=1, seed=0).isfinite().all()
    assert list((tmp_path / "images").glob("samples_epoch000_*.png"))
