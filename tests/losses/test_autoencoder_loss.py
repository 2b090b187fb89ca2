"""AutoencoderLoss: reconstruction, GAN losses, adaptive weight, disc_start, regularisers."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm_lightning.losses.autoencoder import AutoencoderLoss
from ldm_lightning.losses.perceptual import build_lpips


def _mse_perceptual(a, b):
    return (a - b).square().mean(dim=(1, 2, 3), keepdim=True)


def _loss(**kwargs) -> AutoencoderLoss:
    defaults = {"perceptual": _mse_perceptual, "disc_ndf": 8, "disc_num_layers": 2}
    return AutoencoderLoss(**(defaults | kwargs))


def _batch():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    decoder = nn.Conv2d(4, 3, kernel_size=3, padding=1)  # stands in for Decoder.conv_out
    z = torch.randn(2, 4, 16, 16)
    return x, decoder, z


class _CallCounter:
    def __init__(self, module: nn.Module) -> None:
        self.forward = module.forward
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        return self.forward(*args)


@pytest.mark.parametrize("kind", ["hinge", "vanilla"])
def test_discriminator_loss_matches_hand_computation(kind):
    loss_fn = _loss(disc_loss=kind, disc_factor=0.5).eval()
    x, decoder, z = _batch()
    x_hat = decoder(z)
    loss, logs = loss_fn.discriminator_loss(x, x_hat, global_step=0)
    real, fake = loss_fn.discriminator(x), loss_fn.discriminator(x_hat)
    if kind == "hinge":
        expected = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
    else:
        expected = 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
    torch.testing.assert_close(loss, 0.5 * expected)
    torch.testing.assert_close(logs["logits_real"], real.mean().detach())
    torch.testing.assert_close(logs["logits_fake"], fake.mean().detach())
    loss.backward()
    assert decoder.weight.grad is None, "x_hat must be detached"
    assert loss_fn.discriminator.main[0].weight.grad.abs().sum() > 0


def test_discriminator_loss_is_zero_before_disc_start():
    loss_fn = _loss(disc_start=10)
    x, decoder, z = _batch()
    loss, logs = loss_fn.discriminator_loss(x, decoder(z), global_step=9)
    assert loss.item() == 0.0 and logs["disc_loss"].item() == 0.0
    assert loss_fn.discriminator_loss(x, decoder(z), global_step=10)[0].item() > 0


def test_adaptive_weight_and_total_match_independent_computation():
    loss_fn = _loss(disc_weight=0.75, disc_factor=0.5, perceptual_weight=0.3).eval()
    x, decoder, z = _batch()
    x_hat = decoder(z)
    reg = torch.tensor(0.2)
    total, logs = loss_fn.generator_loss(x, x_hat, reg, global_step=0, last_layer=decoder.weight)

    nll = ((x - x_hat).abs() + 0.3 * _mse_perceptual(x, x_hat)).mean()
    g_loss = -loss_fn.discriminator(x_hat).mean()
    grad_nll = torch.autograd.grad(nll, decoder.weight, retain_graph=True)[0]
    grad_g = torch.autograd.grad(g_loss, decoder.weight, retain_graph=True)[0]
    lam = 0.75 * grad_nll.norm() / (grad_g.norm() + 1e-4)
    torch.testing.assert_close(logs["d_weight"], lam.detach())
    torch.testing.assert_close(logs["nll"], nll.detach())
    torch.testing.assert_close(logs["g_loss"], g_loss.detach())
    torch.testing.assert_close(total, nll + lam * 0.5 * g_loss + reg)
    assert logs["disc_factor"].item() == 0.5

    total.backward()
    # lambda is a detached weight: the gradient is that of nll + const * g_loss + reg.
    expected_grad = grad_nll + lam.detach() * 0.5 * grad_g
    torch.testing.assert_close(decoder.weight.grad, expected_grad)


def test_adaptive_weight_is_clamped():
    loss_fn = _loss(adaptive_weight_max=1e-3, disc_weight=0.5).eval()
    x, decoder, z = _batch()
    _, logs = loss_fn.generator_loss(x, decoder(z), torch.tensor(0.0), 0, decoder.weight)
    torch.testing.assert_close(logs["d_weight"], torch.tensor(0.5e-3))


def test_no_discriminator_call_before_disc_start_and_gan_term_after():
    loss_fn = _loss(disc_start=5)
    counter = _CallCounter(loss_fn.discriminator)
    loss_fn.discriminator.forward = counter
    x, decoder, z = _batch()
    reg = torch.tensor(0.1)

    total, logs = loss_fn.generator_loss(
        x, decoder(z), reg, global_step=4, last_layer=decoder.weight
    )
    assert counter.calls == 0
    assert logs["g_loss"].item() == logs["d_weight"].item() == logs["disc_factor"].item() == 0.0
    torch.testing.assert_close(total.detach(), logs["nll"] + reg)

    total, logs = loss_fn.generator_loss(
        x, decoder(z), reg, global_step=5, last_layer=decoder.weight
    )
    assert counter.calls == 1
    assert logs["d_weight"].item() > 0 and logs["disc_factor"].item() == 1.0
    gan_term = logs["d_weight"] * logs["g_loss"]
    assert gan_term.abs().item() > 0
    torch.testing.assert_close(total.detach(), logs["nll"] + gan_term + reg)


def test_without_graph_the_adaptive_weight_is_zero():
    loss_fn = _loss()
    x, decoder, z = _batch()
    with torch.no_grad():
        total, logs = loss_fn.generator_loss(x, decoder(z), torch.tensor(0.0), 0, decoder.weight)
    assert logs["d_weight"].item() == 0.0
    assert logs["g_loss"].item() != 0.0, "the GAN term is still logged"
    torch.testing.assert_close(total, logs["nll"])
    _, logs = loss_fn.generator_loss(x, decoder(z), torch.tensor(0.0), 0, last_layer=None)
    assert logs["d_weight"].item() == 0.0


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_reconstruction_l1_and_l2(kind):
    loss_fn = _loss(rec_loss=kind, rec_weight=2.0, perceptual_weight=0.0, perceptual=None)
    x = torch.zeros(1, 3, 2, 2)
    x_hat = torch.full((1, 3, 2, 2), 0.5)
    x_hat[0, 0, 0, 0] = -2.0
    per_pixel = (x - x_hat).abs() if kind == "l1" else (x - x_hat).square()
    _, logs = loss_fn.generator_loss(x, x_hat, torch.tensor(0.0), global_step=-1)
    expected_rec = (11 * 0.5 + 2.0) / 12 if kind == "l1" else (11 * 0.25 + 4.0) / 12
    torch.testing.assert_close(logs["rec"], torch.tensor(expected_rec))
    torch.testing.assert_close(logs["rec"], per_pixel.mean())
    torch.testing.assert_close(logs["nll"], torch.tensor(2 * expected_rec))
    assert logs["perceptual"].item() == 0.0


def test_regulariser_weighting_vq_and_kl():
    x, decoder, z = _batch()
    x_hat = decoder(z).detach()
    reg = torch.tensor(300.0)
    vq = _loss(regularizer="vq", codebook_weight=0.5, disc_start=1)
    total, logs = vq.generator_loss(x, x_hat, reg, global_step=0)
    torch.testing.assert_close(total - logs["nll"], torch.tensor(150.0))
    assert logs["reg"].item() == 300.0
    kl = _loss(regularizer="kl", kl_weight=1e-2, disc_start=1)
    total, logs = kl.generator_loss(x, x_hat, reg, global_step=0)
    # KL is weighed against the per-sample sum of the reconstruction: / (C*H*W) = / 768
    torch.testing.assert_close(total - logs["nll"], torch.tensor(1e-2 * 300.0 / 768))


def test_lpips_stays_in_eval_and_names_match_compvis():
    lpips_net = build_lpips("squeeze", pretrained_backbone=False)
    loss_fn = _loss(perceptual=lpips_net).train()
    assert loss_fn.training and loss_fn.discriminator.training
    assert not loss_fn.perceptual_loss.training
    assert not any(m.training for m in loss_fn.perceptual_loss.modules())
    keys = set(loss_fn.state_dict())
    assert "discriminator.main.0.weight" in keys
    assert any(k.startswith("perceptual_loss.lin0.") for k in keys)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rec_loss": "l3"}, r"\['l1', 'l2'\]"),
        ({"disc_loss": "wgan"}, r"\['hinge', 'vanilla'\]"),
        ({"regularizer": "none"}, r"\['kl', 'vq'\]"),
        ({"perceptual": None}, "build_lpips"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _loss(**kwargs)
