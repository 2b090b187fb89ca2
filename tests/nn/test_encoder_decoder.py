"""Encoder/Decoder: shapes, CompVis parameter names, attention maths, reference numerics."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm_lightning.nn.encoder_decoder import AttnBlock, Decoder, Encoder, Normalize
from ldm_lightning.nn.quantizer import VectorQuantizer


def _config(ch_mult, attn_resolutions=(), ch=8, z_channels=4, resolution=16):
    return {
        "ch": ch,
        "ch_mult": ch_mult,
        "num_res_blocks": 1,
        "attn_resolutions": list(attn_resolutions),
        "in_channels": 3,
        "resolution": resolution,
        "z_channels": z_channels,
    }


@pytest.mark.parametrize("ch_mult, f", [((1,), 1), ((1, 2), 2), ((1, 2, 2), 4)])
@pytest.mark.parametrize("double_z", [True, False])
def test_shapes_follow_downsampling_factor(ch_mult, f, double_z):
    enc = Encoder(**_config(ch_mult), double_z=double_z)
    dec = Decoder(**_config(ch_mult), out_ch=3)
    x = torch.randn(2, 3, 16, 16)
    moments = enc(x)
    z_out = 8 if double_z else 4
    assert moments.shape == (2, z_out, 16 // f, 16 // f)
    assert enc.downsample_factor == dec.downsample_factor == f
    assert dec(moments[:, :4]).shape == (2, 3, 16, 16)


def test_compvis_parameter_names():
    cfg = _config((1, 2), attn_resolutions=[16, 8])
    enc_keys = set(Encoder(**cfg).state_dict())
    dec_keys = set(Decoder(**cfg, out_ch=3).state_dict())
    expected_enc = {
        "conv_in.weight",
        "down.0.block.0.norm1.weight",
        "down.0.block.0.conv1.weight",
        "down.0.block.0.norm2.bias",
        "down.0.block.0.conv2.bias",
        "down.0.attn.0.norm.weight",
        "down.0.attn.0.q.weight",
        "down.0.attn.0.proj_out.bias",
        "down.0.downsample.conv.weight",
        "down.1.block.0.nin_shortcut.weight",
        "down.1.attn.0.k.weight",
        "mid.block_1.conv1.weight",
        "mid.attn_1.q.weight",
        "mid.attn_1.v.bias",
        "mid.block_2.norm2.weight",
        "norm_out.weight",
        "conv_out.bias",
    }
    expected_dec = {
        "conv_in.weight",
        "mid.attn_1.q.weight",
        "up.0.block.0.nin_shortcut.weight",
        "up.0.block.1.conv2.weight",
        "up.0.attn.1.proj_out.weight",
        "up.1.block.1.conv1.weight",
        "up.1.upsample.conv.weight",
        "norm_out.bias",
        "conv_out.bias",
    }
    assert expected_enc <= enc_keys
    assert expected_dec <= dec_keys
    # No time-embedding projection in the first stage, no downsample on the last level,
    # no upsample on level 0, and the level-0 decoder blocks keep their width (no shortcut).
    assert not any("temb" in k for k in enc_keys | dec_keys)
    assert not any(k.startswith("down.1.downsample") for k in enc_keys)
    assert not any(k.startswith("up.0.upsample") for k in dec_keys)
    assert "up.0.block.1.nin_shortcut.weight" not in dec_keys
    assert "down.0.block.0.nin_shortcut.weight" not in enc_keys


def test_matches_diffusers_autoencoder_through_checkpoint_conversion():
    """CompVis-named weights, converted by diffusers' own LDM converter, reproduce our outputs.

    diffusers' converter reads CompVis key names, so a strict load of its output into
    diffusers' AutoencoderKL proves both the names and the maths (norms, padding, attention).
    """
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg = _config((1, 2), ch=32)
    enc, dec = Encoder(**cfg), Decoder(**cfg, out_ch=3)
    for p in list(enc.parameters()) + list(dec.parameters()):
        nn.init.normal_(p, std=0.05)
    ldm = {f"first_stage_model.encoder.{k}": v for k, v in enc.state_dict().items()}
    ldm |= {f"first_stage_model.decoder.{k}": v for k, v in dec.state_dict().items()}
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
    ).eval()
    converted = convert_ldm_vae_checkpoint(
        ldm, {"down_block_types": [0, 0], "up_block_types": [0, 0]}
    )
    for name, module in (("encoder", vae.encoder), ("decoder", vae.decoder)):
        part = {k[len(name) + 1 :]: v for k, v in converted.items() if k.startswith(name + ".")}
        module.load_state_dict(part, strict=True)
    n_ours = sum(p.numel() for p in [*enc.parameters(), *dec.parameters()])
    n_ref = sum(p.numel() for p in [*vae.encoder.parameters(), *vae.decoder.parameters()])
    assert n_ours == n_ref

    x = torch.randn(2, 3, 16, 16)
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), vae.encoder(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dec(z), vae.decoder(z), rtol=1e-4, atol=1e-5)


def test_attention_equals_hand_written_softmax():
    block = AttnBlock(8)
    for p in block.parameters():
        nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 8, 4, 5)
    h = block.norm(x)
    q = block.q(h).flatten(2)  # [B, C, N]
    k = block.k(h).flatten(2)
    v = block.v(h).flatten(2)
    weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(8), dim=-1)
    attended = torch.einsum("bij,bcj->bci", weights, v).reshape(2, 8, 4, 5)
    expected = x + block.proj_out(attended)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_downsample_pads_right_and_bottom_only():
    enc = Encoder(**_config((1, 2)))
    down = enc.down[0].downsample
    x = torch.randn(1, 8, 6, 6)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
    torch.testing.assert_close(down(x), expected)


def test_gradient_reaches_conv_in_and_last_layer_is_conv_out():
    enc = Encoder(**_config((1, 2), attn_resolutions=[8]), double_z=False)
    dec = Decoder(**_config((1, 2), attn_resolutions=[8]), out_ch=3)
    dec(enc(torch.randn(2, 3, 16, 16))).square().mean().backward()
    assert enc.conv_in.weight.grad.abs().sum() > 0
    assert dec.conv_in.weight.grad.abs().sum() > 0
    assert dec.last_layer is dec.conv_out.weight


def test_normalize_groups_and_bad_width():
    assert Normalize(8).num_groups == 8
    assert Normalize(64).num_groups == 32
    assert Normalize(64).eps == 1e-6
    with pytest.raises(ValueError, match="divisible by 32"):
        Normalize(48)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="ch_mult"):
        Encoder(**_config(()))
    enc = Encoder(**_config((1, 2, 2)))
    with pytest.raises(ValueError, match="multiple of 4"):
        enc(torch.randn(1, 3, 18, 16))


@pytest.fixture
def one_thread():
    """A 100-step loop of tiny ops: a second intra-op thread only adds synchronisation, which on
    a shared, oversubscribed CPU made this test ~100x slower (300 s instead of 3 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_vq_autoencoder_chain_overfits_one_batch(one_thread):
    """Encoder -> quant_conv -> VQ -> post_quant_conv -> Decoder learns a fixed tiny batch."""
    cfg = _config((1, 2), z_channels=4)
    enc, dec = Encoder(**cfg, double_z=False), Decoder(**cfg, out_ch=3)
    quant_conv, post_quant_conv = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
    quantizer = VectorQuantizer(n_embed=32, embed_dim=4)
    modules = nn.ModuleList([enc, quant_conv, quantizer, post_quant_conv, dec])
    opt = torch.optim.Adam(modules.parameters(), lr=3e-3)
    x = torch.rand(2, 3, 16, 16) * 2 - 1

    def step() -> float:
        z_q, vq_loss, _ = quantizer(quant_conv(enc(x)))
        rec = F.mse_loss(dec(post_quant_conv(z_q)), x)
        opt.zero_grad()
        (rec + vq_loss).backward()
        opt.step()
        return rec.item()

    first = step()
    for _ in range(99):
        last = step()
    assert last < 0.1 * first
