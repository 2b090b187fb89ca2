"""build_lpips: offline behaviour, frozen metric, clear error when the backbone is missing."""

import socket
import urllib.error
import urllib.request
from pathlib import Path

import lpips
import pytest
import torch

from ldm_lightning.losses.perceptual import build_lpips


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Empty hub cache and every way out to the network raising."""

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return tmp_path / "hub"


def test_missing_backbone_names_file_folder_and_offline_option(no_network):
    with pytest.raises(RuntimeError) as excinfo:
        build_lpips("vgg", pretrained_backbone=True)
    message = str(excinfo.value)
    assert "vgg16-397923af.pth" in message
    assert str(no_network / "checkpoints") in message
    assert "pretrained_backbone=false" in message


def test_random_backbone_works_offline_and_is_a_frozen_distance(no_network):
    model = build_lpips("squeeze", pretrained_backbone=False)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    # The calibrated linear heads still come from the lpips package itself.
    heads = torch.load(Path(lpips.__file__).parent / "weights/v0.1/squeeze.pth", map_location="cpu")
    torch.testing.assert_close(model.lin0.model[1].weight, heads["lin0.model.1.weight"])

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.5 * torch.randn_like(x)).clamp(-1, 1).requires_grad_(True)
    same, different = model(x, x), model(x, y)
    assert same.shape == (2, 1, 1, 1)
    torch.testing.assert_close(same, torch.zeros_like(same))
    assert (different > 0).all()
    different.sum().backward()
    assert y.grad.abs().sum() > 0


def test_unknown_backbone_raises():
    with pytest.raises(ValueError, match="squeeze"):
        build_lpips("resnet")
