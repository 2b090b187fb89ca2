"""FirstStage: the plain network a later stage holds; IdentityFirstStage for pixel space."""

from __future__ import annotations

import pytest
import torch

from ldm_lightning.nn.first_stage import (
    PARTS,
    FirstStage,
    IdentityFirstStage,
    is_first_stage_key,
)

TINY = dict(image_size=16, ch=8, ch_mult=(1, 2), num_res_blocks=1, n_embed=16)


@pytest.mark.parametrize("regularizer", ["vq", "kl"])
def test_only_the_network_is_in_the_state_dict(regularizer: str) -> None:
    net = FirstStage(regularizer=regularizer, **TINY)
    prefixes = {key.split(".")[0] for key in net.state_dict()}
    assert prefixes == set(PARTS) - ({"quantize"} if regularizer == "kl" else set())
    assert all(is_first_stage_key(key) for key in net.state_dict())
    assert not is_first_stage_key("loss.discriminator.main.0.weight")
    assert not is_first_stage_key("train_batches")


@pytest.mark.parametrize("regularizer", ["vq", "kl"])
def test_encode_decode_shapes_and_factor(regularizer: str) -> None:
    net = FirstStage(regularizer=regularizer, z_channels=4, embed_dim=4, **TINY).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = net.encode(x)
    assert z.shape == (2, 4, 8, 8) and net.factor == 2 and net.latent_channels == 4
    assert net.decode(z).shape == x.shape
    assert net(x)[0].shape == x.shape


def test_config_records_every_argument_and_from_config_ignores_training_keys() -> None:
    net = FirstStage(regularizer="kl", **TINY)
    assert net.config["regularizer"] == "kl" and net.config["z_channels"] == 3  # a default
    autoencoder_hparams = {**net.config, "loss": {"disc_start": 5}, "optimizer": {}, "compile": 0}
    rebuilt = FirstStage.from_config(autoencoder_hparams)
    assert rebuilt.config == net.config
    rebuilt.load_state_dict(net.state_dict())


def test_identity_first_stage_is_pixel_space() -> None:
    identity = IdentityFirstStage(channels=1)
    x = torch.randn(2, 1, 4, 4)
    assert identity.encode(x) is x and identity.decode(x) is x
    assert identity.factor == 1 and identity.latent_channels == 1
    assert not list(identity.state_dict())
