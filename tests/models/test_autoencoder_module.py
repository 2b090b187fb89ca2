"""AutoencoderModule: shapes, gradients, GAN schedule, CompVis layout, checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from ldm_lightning.data.shapes import ShapesDataModule
from ldm_lightning.models import AutoencoderModule
from ldm_lightning.models.checkpoints import load_stage, stamp

TINY = dict(
    image_size=16,
    ch=8,
    ch_mult=(1, 2),
    num_res_blocks=1,
    z_channels=3,
    embed_dim=3,
    n_embed=16,
    loss={"perceptual_weight": 0.0, "disc_ndf": 8, "disc_num_layers": 2},
    optimizer={"base_lr": 1e-3, "scale_lr": False},
)


def tiny(**overrides) -> AutoencoderModule:
    return AutoencoderModule(**{**TINY, **overrides})


def tiny_data(**overrides) -> ShapesDataModule:
    kwargs = dict(image_size=16, batch_size=4, num_train=8, num_val=4, num_test=4)
    return ShapesDataModule(**{**kwargs, **overrides})


def quiet_trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


@pytest.mark.parametrize("regularizer", ["vq", "kl"])
def test_encode_decode_shapes(regularizer: str) -> None:
    model = tiny(regularizer=regularizer).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = model.encode(x)
    assert z.shape == (2, 3, 8, 8) and model.factor == 2
    assert model.decode(z).shape == x.shape


def test_kl_encode_is_the_posterior_mean_unless_sampling() -> None:
    model = tiny(regularizer="kl").eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(model.encode(x), model.encode(x))
    a = model.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
    b = model.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, b)
    mean, logvar = model.quant_conv(model.encoder(x)).chunk(2, dim=1)
    torch.testing.assert_close(model.encode(x), mean)


def test_image_size_not_divisible_by_f_fails_at_start() -> None:
    with pytest.raises(ValueError, match=r"image_size=18 .* f=4"):
        tiny(image_size=18, ch_mult=(1, 2, 2))


def test_image_too_small_for_the_discriminator_fails_at_start() -> None:
    with pytest.raises(ValueError, match=r"image_size=16 is too small for a 3-layer PatchGAN"):
        tiny(loss={"perceptual_weight": 0.0, "disc_num_layers": 3})


def test_unknown_regularizer_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"valid: \('vq', 'kl'\)"):
        tiny(regularizer="vae")


def test_straight_through_gradient_reaches_the_encoder() -> None:
    model = tiny()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    x_hat, reg, _ = model(x)
    ((x - x_hat).abs().mean() + reg).backward()
    assert model.encoder.conv_in.weight.grad is not None
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0


def test_scale_factor_is_one_over_latent_std() -> None:
    model = tiny(regularizer="kl").eval()
    batches = [{"image": torch.rand(4, 3, 16, 16) * 2 - 1} for _ in range(3)]
    with torch.no_grad():
        z = torch.cat([model.encode(b["image"]) for b in batches])
    expected = 1.0 / z.double().std(unbiased=False).item()
    assert model.estimate_scale_factor(batches) == pytest.approx(expected, rel=1e-6)
    assert model.estimate_scale_factor(batches, max_batches=1) == pytest.approx(
        1.0 / z[:4].double().std(unbiased=False).item(), rel=1e-6
    )


def test_overfitting_one_batch_lowers_the_reconstruction_loss(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tiny(
        regularizer="kl",
        loss={"perceptual_weight": 0.0, "disc_start": 10**6, "disc_ndf": 8, "disc_num_layers": 2},
        optimizer={"base_lr": 3e-3, "scale_lr": False},
    )
    data = tiny_data()
    # overfit_batches trains on the first batch of the unshuffled training set.
    batch = next(iter(data.loader("train", shuffle=False)))
    with torch.no_grad():
        before = (model(batch["image"], sample_posterior=False)[0] - batch["image"]).abs().mean()
    quiet_trainer(
        tmp_path, max_steps=80, overfit_batches=1, num_sanity_val_steps=0, limit_val_batches=0
    ).fit(model, datamodule=data)
    model.eval()
    with torch.no_grad():
        after = (model(batch["image"], sample_posterior=False)[0] - batch["image"]).abs().mean()
    assert after < 0.5 * before, (before, after)


def test_discriminator_is_off_before_disc_start(tmp_path: Path) -> None:
    model = tiny(
        loss={"perceptual_weight": 0.0, "disc_start": 3, "disc_ndf": 8, "disc_num_layers": 2}
    )
    initial = [p.detach().clone() for p in model.loss.discriminator.parameters()]
    quiet_trainer(tmp_path, max_steps=3, limit_val_batches=0, num_sanity_val_steps=0).fit(
        model, datamodule=tiny_data(num_train=12)
    )
    # 3 batches, all before disc_start: only the generator stepped (3 optimizer steps).
    assert int(model.train_batches) == 3
    for before, after in zip(initial, model.loss.discriminator.parameters()):
        assert torch.equal(before, after)
    quiet_trainer(tmp_path, max_steps=5, limit_val_batches=0, num_sanity_val_steps=0).fit(
        model, datamodule=tiny_data(num_train=12)
    )
    changed = [
        not torch.equal(b, a) for b, a in zip(initial, model.loss.discriminator.parameters())
    ]
    assert any(changed)


# CompVis first-stage names (ldm/models/autoencoder.py + diffusionmodules/model.py) for
# ch_mult (1, 2), one res block, no attention: written out by hand, not read from our module.
COMPVIS_KEYS = [
    "encoder.conv_in.weight",
    "encoder.down.0.block.0.norm1.weight",
    "encoder.down.0.block.0.conv1.weight",
    "encoder.down.0.block.0.norm2.bias",
    "encoder.down.0.block.0.conv2.weight",
    "encoder.down.0.downsample.conv.weight",
    "encoder.down.1.block.0.nin_shortcut.weight",
    "encoder.mid.block_1.conv1.weight",
    "encoder.mid.attn_1.norm.weight",
    "encoder.mid.attn_1.q.weight",
    "encoder.mid.attn_1.k.weight",
    "encoder.mid.attn_1.v.weight",
    "encoder.mid.attn_1.proj_out.weight",
    "encoder.mid.block_2.conv2.bias",
    "encoder.norm_out.weight",
    "encoder.conv_out.weight",
    "decoder.conv_in.weight",
    "decoder.mid.attn_1.q.bias",
    "decoder.up.0.block.0.conv1.weight",
    "decoder.up.0.block.1.conv2.weight",
    "decoder.up.0.block.0.nin_shortcut.weight",
    "decoder.up.1.upsample.conv.weight",
    "decoder.norm_out.bias",
    "decoder.conv_out.weight",
    "quant_conv.weight",
    "post_quant_conv.bias",
    "quantize.embedding.weight",
]


def test_state_dict_follows_compvis_names() -> None:
    keys = set(tiny().state_dict())
    assert set(COMPVIS_KEYS) <= keys, sorted(set(COMPVIS_KEYS) - keys)


def test_compvis_checkpoint_loads_and_gives_identical_outputs(tmp_path: Path) -> None:
    source = tiny().eval()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    compvis_like = {
        k: v
        for k, v in source.state_dict().items()
        if k in set(COMPVIS_KEYS)
        or not (k.startswith("quantize.") or k.startswith("loss.") or k == "train_batches")
    }
    compvis_like["quantize.embedding.weight"] = source.quantize.embedding.weight.detach().clone()
    compvis_like["loss.logvar"] = torch.zeros(())
    compvis_like["loss.perceptual_loss.net.slice1.0.weight"] = torch.zeros(1)
    path = tmp_path / "compvis.ckpt"
    # As in CompVis' releases: old Lightning keyed callback state by the callback class, which
    # the safe reader maps to a placeholder (no trust_checkpoint needed).
    callbacks = {ModelCheckpoint: {"best_model_score": torch.tensor(0.1), "monitor": "val/loss"}}
    torch.save({"state_dict": compvis_like, "global_step": 123, "callbacks": callbacks}, path)

    loaded = AutoencoderModule.from_compvis_checkpoint(path, **TINY).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], source(x)[0], rtol=0, atol=0)
        torch.testing.assert_close(loaded.encode(x), source.encode(x), rtol=0, atol=0)


def test_compvis_checkpoint_of_another_architecture_is_refused(tmp_path: Path) -> None:
    other = {k: v for k, v in tiny(ch_mult=(1, 2, 2)).state_dict().items()}
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": other}, path)
    with pytest.raises(ValueError, match="does not match this autoencoder's architecture"):
        AutoencoderModule.from_compvis_checkpoint(path, **TINY)


def test_load_stage_names_what_a_wrong_checkpoint_holds(tmp_path: Path) -> None:
    model = tiny()
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    stamp(checkpoint, "latent_diffusion", model)
    path = tmp_path / "ldm.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"is a latent_diffusion checkpoint, but an autoencoder"):
        load_stage(AutoencoderModule, path, "autoencoder", "model.first_stage.ckpt_path")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_stage(AutoencoderModule, tmp_path / "missing.ckpt", "autoencoder")
    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_stage(AutoencoderModule, tmp_path / "broken.ckpt", "autoencoder")


def test_load_stage_round_trip(tmp_path: Path) -> None:
    model = tiny().eval()
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    stamp(checkpoint, "autoencoder", model)
    torch.save(checkpoint, tmp_path / "ae.ckpt")
    loaded = load_stage(AutoencoderModule, tmp_path / "ae.ckpt", "autoencoder")
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), model.encode(x))


def test_cosine_schedule_steps_both_optimizers_once_per_batch(tmp_path: Path) -> None:
    """Manual optimisation: the schedule advances per batch, for G and D alike, to its floor."""
    model = tiny(optimizer={"base_lr": 1e-3, "scale_lr": False, "schedule": "cosine",
                            "warmup_steps": 2, "min_lr_ratio": 0.1})
    trainer = quiet_trainer(tmp_path, max_epochs=2, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=tiny_data(num_train=12))  # 3 batches x 2 epochs
    assert int(model.train_batches) == 6
    for optimizer in trainer.optimizers:
        assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    for scheduler in model.lr_schedulers():
        assert scheduler.last_epoch == 6
