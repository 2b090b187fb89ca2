"""UNetModel: shapes, CompVis layout, conditioning, checkpointing, a tiny overfit, errors."""

from typing import Any

import pytest
import torch
from torch import nn

from ldm_lightning.nn.attention import AttentionBlock, SpatialTransformer
from ldm_lightning.nn.unet import UNetModel

TINY: dict[str, Any] = {
    "in_channels": 2,
    "out_channels": 2,
    "model_channels": 8,
    "num_res_blocks": 1,
    "attention_resolutions": [2],
    "channel_mult": (1, 2),
    "num_head_channels": 4,
}


def _unet(**overrides: Any) -> UNetModel:
    return UNetModel(**{**TINY, **overrides})


def _randomise(model: nn.Module) -> nn.Module:
    """Give every all-zero parameter (zero-initialised convs, norm biases) random values."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.1)
    return model


CONFIGS = {
    "self_attention": {},
    "cross_attention": {"context_dim": 6, "transformer_depth": 2},
    "classes": {"num_classes": 5, "num_heads": 2, "num_head_channels": -1},
    "transformer_no_context": {"use_spatial_transformer": True},
    "three_levels": {
        "channel_mult": (1, 2, 2),
        "attention_resolutions": [2, 4],
        "num_res_blocks": 2,
    },
    "resblock_updown": {
        "resblock_updown": True,
        "conv_resample": False,
        "use_scale_shift_norm": False,
    },
}


def _inputs(model: UNetModel, batch: int = 2, size: int = 16) -> dict[str, torch.Tensor]:
    kwargs = {
        "x": torch.randn(batch, model.in_channels, size, size),
        "timesteps": torch.randint(0, 1000, (batch,)),
    }
    if model.context_dim is not None:
        kwargs["context"] = torch.randn(batch, 3, model.context_dim)
    if model.num_classes is not None:
        kwargs["class_labels"] = torch.randint(0, model.num_classes, (batch,))
    return kwargs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_output_shape_and_zero_initial_output(name: str) -> None:
    model = _unet(**CONFIGS[name])
    out = model(**_inputs(model))
    assert out.shape == (2, 2, 16, 16)
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised `out` conv
    assert _randomise(model)(**_inputs(model)).abs().mean() > 1e-3


def test_attention_kind_follows_context_dim() -> None:
    def kinds(model: nn.Module) -> set[type]:
        return {
            type(m) for m in model.modules() if isinstance(m, AttentionBlock | SpatialTransformer)
        }

    assert kinds(_unet()) == {AttentionBlock}
    assert kinds(_unet(context_dim=6)) == {SpatialTransformer}
    assert kinds(_unet(use_spatial_transformer=True)) == {SpatialTransformer}


def test_compvis_parameter_layout() -> None:
    """Names and shapes of CompVis' UNetModel for the same config, worked out by hand."""
    model = _unet(model_channels=32, context_dim=16, num_head_channels=8, num_classes=3)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "time_embed.0.weight": (128, 32),
        "time_embed.2.weight": (128, 128),
        "label_emb.weight": (3, 128),
        "input_blocks.0.0.weight": (32, 2, 3, 3),
        "input_blocks.1.0.in_layers.2.weight": (32, 32, 3, 3),
        "input_blocks.1.0.emb_layers.1.weight": (64, 128),  # scale and shift
        "input_blocks.1.0.out_layers.3.weight": (32, 32, 3, 3),
        "input_blocks.2.0.op.weight": (32, 32, 3, 3),
        "input_blocks.3.0.skip_connection.weight": (64, 32, 1, 1),
        "input_blocks.3.1.norm.weight": (64,),
        "input_blocks.3.1.proj_in.weight": (64, 64, 1, 1),
        "input_blocks.3.1.transformer_blocks.0.attn1.to_q.weight": (64, 64),
        "input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight": (64, 16),
        "input_blocks.3.1.transformer_blocks.0.attn2.to_out.0.weight": (64, 64),
        "input_blocks.3.1.transformer_blocks.0.ff.net.0.proj.weight": (512, 64),
        "input_blocks.3.1.transformer_blocks.0.ff.net.2.weight": (64, 256),
        "input_blocks.3.1.transformer_blocks.0.norm3.weight": (64,),
        "input_blocks.3.1.proj_out.weight": (64, 64, 1, 1),
        "middle_block.0.in_layers.2.weight": (64, 64, 3, 3),
        "middle_block.1.transformer_blocks.0.attn1.to_v.weight": (64, 64),
        "middle_block.2.out_layers.3.weight": (64, 64, 3, 3),
        "output_blocks.0.0.in_layers.2.weight": (64, 128, 3, 3),
        "output_blocks.1.0.skip_connection.weight": (64, 96, 1, 1),
        "output_blocks.1.2.conv.weight": (64, 64, 3, 3),
        "output_blocks.2.0.in_layers.2.weight": (32, 96, 3, 3),
        "output_blocks.3.0.in_layers.2.weight": (32, 64, 3, 3),
        "out.0.weight": (32,),
        "out.2.weight": (2, 32, 3, 3),
    }
    assert {k: shapes.get(k) for k in expected} == expected
    assert len(model.input_blocks) == 4 and len(model.output_blocks) == 4
    assert not any(k.startswith("output_blocks.2.1") for k in shapes)  # no attention at ds=1
    heads = model.middle_block[1].transformer_blocks[0].attn1.heads
    assert heads == 8  # 64 channels / num_head_channels 8


def test_time_context_and_class_change_the_output() -> None:
    model = _randomise(_unet(context_dim=6, num_classes=4))
    x = torch.randn(2, 2, 16, 16)
    t, labels = torch.tensor([10, 10]), torch.tensor([0, 1])
    ctx = torch.randn(2, 3, 6, requires_grad=True)
    base = model(x, t, ctx, labels)
    assert not torch.allclose(base, model(x, torch.tensor([900, 900]), ctx, labels), atol=1e-4)
    assert not torch.allclose(base, model(x, t, torch.randn(2, 3, 6), labels), atol=1e-4)
    assert not torch.allclose(base, model(x, t, ctx, torch.tensor([3, 3])), atol=1e-4)
    base.square().mean().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0


def test_scalar_and_float_timesteps_broadcast() -> None:
    model = _randomise(_unet())
    x = torch.randn(2, 2, 16, 16)
    expected = model(x, torch.tensor([7, 7]))
    assert torch.allclose(model(x, torch.tensor(7)), expected)
    assert torch.allclose(model(x, torch.tensor([7.0, 7.0])), expected)


@pytest.mark.parametrize("name", ["cross_attention", "resblock_updown"])
def test_gradient_checkpointing_gives_identical_gradients(name: str) -> None:
    plain = _randomise(_unet(**CONFIGS[name], dropout=0.2))
    ckpt = _unet(**CONFIGS[name], dropout=0.2, use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    recomputed = []
    ckpt.input_blocks[1][0].in_layers.register_forward_hook(lambda *_: recomputed.append(1))
    inputs = _inputs(plain)
    grads = []
    for model in (plain, ckpt):
        model.train()
        torch.manual_seed(3)  # same dropout masks in both runs
        model(**inputs).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert len(recomputed) == 2  # forward plus recomputation in backward
    for n, g in grads[0].items():
        assert torch.allclose(g, grads[1][n], atol=1e-6, rtol=1e-5), n


def test_bf16_autocast_close_to_fp32() -> None:
    model = _randomise(_unet(context_dim=6))
    inputs = _inputs(model)
    ref = model(**inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).norm() / ref.norm() < 0.05


def test_tiny_unet_overfits_fixed_batch() -> None:
    model = _unet()
    x_t, t, eps = torch.randn(4, 2, 8, 8), torch.randint(0, 1000, (4,)), torch.randn(4, 2, 8, 8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        loss = (model(x_t, t) - eps).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"num_heads": 2}, "exactly one of num_heads"),
        ({"num_head_channels": -1}, "exactly one of num_heads"),
        ({"context_dim": 6, "use_spatial_transformer": False}, "use_spatial_transformer=True"),
        ({"attention_resolutions": [2, 8]}, r"factors \[8\] that no level reaches"),
        ({"channel_mult": ()}, "at least one level"),
        ({"num_head_channels": 3}, "cannot be split into heads"),
    ],
)
def test_bad_config_raises(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _unet(**overrides)


def test_bad_inputs_raise() -> None:
    plain = _unet()
    x, t = torch.randn(2, 2, 16, 16), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="10x16 is not divisible by 4"):
        _unet(channel_mult=(1, 2, 4))(torch.randn(2, 2, 10, 16), t)
    with pytest.raises(ValueError, match=r"\[B, 2, H, W\], got shape \(2, 3, 16, 16\)"):
        plain(torch.randn(2, 3, 16, 16), t)
    with pytest.raises(ValueError, match="timesteps must be"):
        plain(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="no cross-attention"):
        plain(x, t, context=torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="class_labels are required"):
        plain(x, t, class_labels=torch.tensor([0, 1]))

    cond = _unet(context_dim=6, num_classes=3)
    labels = torch.tensor([0, 2])
    with pytest.raises(ValueError, match="null context"):
        cond(x, t, class_labels=labels)
    with pytest.raises(ValueError, match=r"context must be \[B=2, L, 6\]"):
        cond(x, t, context=torch.randn(2, 3, 5), class_labels=labels)
    with pytest.raises(ValueError, match="class_labels missing"):
        cond(x, t, context=torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="class_labels must be"):
        cond(x, t, context=torch.randn(2, 3, 6), class_labels=labels[:1])
