"""NLayerDiscriminator: patch shapes, taming's layer layout and names, DCGAN init."""

import pytest
import torch
from torch import nn

from ldm_lightning.nn.discriminator import NLayerDiscriminator, weights_init


@pytest.mark.parametrize("n_layers, patches", [(2, 6), (3, 2)])
def test_patch_output_shape(n_layers, patches):
    disc = NLayerDiscriminator(in_channels=3, ndf=8, n_layers=n_layers)
    assert disc(torch.randn(2, 3, 32, 32)).shape == (2, 1, patches, patches)


def test_layout_matches_taming():
    disc = NLayerDiscriminator(in_channels=3, ndf=8, n_layers=3)
    convs = [m for m in disc.main if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [
        (3, 8, 2),
        (8, 16, 2),
        (16, 32, 2),
        (32, 64, 1),
        (64, 1, 1),
    ]
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]
    # taming's state-dict names (CompVis keeps them under loss.discriminator.*)
    keys = set(disc.state_dict())
    assert {"main.0.weight", "main.0.bias", "main.2.weight", "main.3.running_mean"} <= keys
    assert {"main.11.weight", "main.11.bias"} <= keys
    assert len(keys) == 2 + 3 * (1 + 5) + 2


def test_nf_mult_is_capped_at_8():
    disc = NLayerDiscriminator(in_channels=1, ndf=2, n_layers=5)
    widths = [m.out_channels for m in disc.main if isinstance(m, nn.Conv2d)]
    assert widths == [2, 4, 8, 16, 16, 16, 1]


def test_weights_init_statistics():
    torch.manual_seed(0)
    disc = NLayerDiscriminator(in_channels=3, ndf=64, n_layers=3)
    conv_weights = torch.cat([m.weight.flatten() for m in disc.main if isinstance(m, nn.Conv2d)])
    bn = [m for m in disc.main if isinstance(m, nn.BatchNorm2d)]
    bn_weights = torch.cat([m.weight.flatten() for m in bn])
    assert abs(conv_weights.mean().item()) < 1e-3
    assert conv_weights.std().item() == pytest.approx(0.02, rel=0.02)
    assert bn_weights.mean().item() == pytest.approx(1.0, abs=0.005)
    assert bn_weights.std().item() == pytest.approx(0.02, rel=0.15)
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in bn)

    linear = nn.Linear(4, 4)
    before = linear.weight.clone()
    linear.apply(weights_init)
    assert torch.equal(linear.weight, before)


def test_bad_n_layers_raises():
    with pytest.raises(ValueError, match="n_layers"):
        NLayerDiscriminator(n_layers=0)
