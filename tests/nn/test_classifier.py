"""EncoderUNetModel: the UNet's down path and middle block, a pooled linear head, errors."""

from typing import Any

import pytest
import torch

from ldm_lightning.nn.classifier import EncoderUNetModel
from ldm_lightning.nn.unet import UNetModel
from tests.nn.test_unet import TINY, _randomise

SETTINGS: dict[str, Any] = {k: v for k, v in TINY.items() if k != "out_channels"}


def _classifier(**overrides: Any) -> EncoderUNetModel:
    return EncoderUNetModel(**{**SETTINGS, "out_channels": 5, **overrides})


def test_logits_shape_and_a_uniform_start() -> None:
    model = _classifier()
    logits = model(torch.randn(3, 2, 16, 16), torch.tensor([0, 10, 999]))
    assert logits.shape == (3, 5)
    assert not logits.any()  # the zero-initialised head: p(y | x_t) uniform before training


def test_its_trunk_is_the_unets_down_path_and_middle_block() -> None:
    """Same settings, same names and shapes for every parameter of the shared part."""
    torch.manual_seed(0)
    unet = UNetModel(**TINY).state_dict()
    encoder = _classifier().state_dict()
    trunk = {k: v.shape for k, v in encoder.items() if not k.startswith("out.")}
    assert trunk == {k: unet[k].shape for k in trunk}
    assert {k.split(".")[0] for k in trunk} == {"time_embed", "input_blocks", "middle_block"}


def test_time_and_input_change_the_logits_and_gradients_reach_the_input() -> None:
    torch.manual_seed(0)
    model = _randomise(_classifier())
    x = torch.randn(2, 2, 16, 16, requires_grad=True)
    logits = model(x, torch.tensor([5, 5]))
    assert not torch.allclose(logits, model(x, torch.tensor([500, 500])))
    assert not torch.allclose(logits[0], logits[1])
    (grad,) = torch.autograd.grad(logits[:, 0].sum(), x)
    assert grad.abs().sum() > 0


def test_a_tiny_classifier_learns_a_fixed_batch() -> None:
    torch.manual_seed(0)
    model = _classifier(out_channels=2)
    x = torch.randn(8, 2, 16, 16)
    labels = torch.arange(8) % 2
    x[labels == 1] += 1.0
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(x, torch.zeros(8)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert (model(x, torch.zeros(8)).argmax(1) == labels).all()


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        ({"x": torch.randn(2, 3, 16, 16)}, r"x must be \[B, 2, H, W\]"),
        ({"x": torch.randn(2, 2, 15, 15)}, "not divisible by 2"),
        ({"timesteps": torch.zeros(3)}, r"timesteps must be \[B\] = \[2\]"),
    ],
)
def test_bad_inputs_raise(inputs: dict[str, torch.Tensor], match: str) -> None:
    arguments = {"x": torch.randn(2, 2, 16, 16), "timesteps": torch.zeros(2), **inputs}
    with pytest.raises(ValueError, match=match):
        _classifier()(**arguments)


def test_bad_settings_raise() -> None:
    with pytest.raises(ValueError, match="set exactly one of num_heads"):
        _classifier(num_heads=2)
    with pytest.raises(ValueError, match="no level reaches"):
        _classifier(attention_resolutions=[8])
