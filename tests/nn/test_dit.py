"""DiT: the paper's sizes, adaLN-Zero at initialisation, patchify and position embedding,
conditioning, gradient checkpointing, compile-friendliness, errors."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from ldm_lightning.nn.dit import SIZES, DiT, sincos_2d
from tests.nn.test_unet import _randomise

TINY: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "input_size": 8,
    "patch_size": 2,
    "hidden_size": 16,
    "depth": 2,
    "num_heads": 2,
}
CONDITIONS = {
    "plain": {},
    "classes": {"num_classes": 5},
    "context": {"context_dim": 6},
    "both": {"num_classes": 5, "context_dim": 6},
}


def _dit(**overrides: Any) -> DiT:
    return DiT(**{**TINY, **overrides})


def _inputs(model: DiT, batch: int = 2) -> dict[str, torch.Tensor]:
    kwargs = {
        "x": torch.randn(batch, model.in_channels, model.input_size, model.input_size),
        "timesteps": torch.randint(0, 1000, (batch,)),
    }
    if model.context_dim is not None:
        kwargs["context"] = torch.randn(batch, 3, model.context_dim)
    if model.num_classes is not None:
        kwargs["class_labels"] = torch.randint(0, model.num_classes, (batch,))
    return kwargs


# Table 1 of Peebles & Xie (2023): millions of parameters of DiT-S/2, B/2, L/2, XL/2.
PAPER_MILLIONS = {"S": 33, "B": 130, "L": 458, "XL": 675}


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("out_channels", [4, 8])
def test_parameter_counts_match_table_1(size: str, out_channels: int) -> None:
    """On 4x32x32 latents with 1000 classes and the null class. The reference code counts with
    learned sigma (8 output channels) and its frozen position embedding, a parameter there (a
    buffer here): 32.96M, 130.51M, 458.10M, 675.13M. This model's own count (4 output channels,
    no position embedding) is 0.1-0.4% lower (32.86M ... 674.82M); both are within 1%."""
    hidden_size, depth, num_heads = SIZES[size]
    with torch.device("meta"):
        model = DiT(in_channels=4, out_channels=out_channels, input_size=32, patch_size=2,
                    hidden_size=hidden_size, depth=depth, num_heads=num_heads, num_classes=1001)
    own = sum(p.numel() for p in model.parameters())
    reference = own + model.pos_embed.numel()
    for count in (own, reference):
        assert count / 1e6 == pytest.approx(PAPER_MILLIONS[size], rel=0.01)


@pytest.mark.parametrize("name", list(CONDITIONS))
def test_adaln_zero_blocks_are_the_identity_and_the_output_zero_at_init(name: str) -> None:
    torch.manual_seed(0)
    model = _dit(**CONDITIONS[name])
    inputs = _inputs(model)
    tokens = torch.randn(2, 16, 16)
    c = torch.randn(2, 16)
    context = inputs.get("context")
    for block in model.blocks:
        assert torch.equal(block(tokens, c, context), tokens)
    out = model(**inputs)
    assert out.shape == inputs["x"].shape and torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("patch_size", [1, 2, 4, 8])
def test_the_output_has_the_input_shape_for_every_patch_size(patch_size: int) -> None:
    model = _randomise(_dit(input_size=16, patch_size=patch_size, out_channels=3))
    x = torch.randn(2, 3, 16, 16)
    out = model(x, torch.tensor([3, 500]))
    assert out.shape == (2, 3, 16, 16) and out.abs().mean() > 1e-3
    assert model.x_embedder(x).shape == (2, (16 // patch_size) ** 2, 16)


def test_unpatchify_inverts_patchify_order() -> None:
    """Token ``i * g + j`` holds patch ``(i, j)``, its values laid out ``(row, col, channel)``."""
    model = _dit(input_size=8, patch_size=4, out_channels=2)
    x = torch.randn(1, 2, 8, 8)
    g, p = 2, 4
    tokens = torch.stack([
        x[0, :, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(1, 2, 0).flatten()
        for i in range(g) for j in range(g)
    ])[None]
    assert torch.equal(model.unpatchify(tokens), x)


def test_sincos_position_embedding_by_hand() -> None:
    """Width 8 on a 2x2 grid: per axis 4 channels, frequencies 1 and 10000 ** -0.5; the first
    half encodes the column, the second the row (MAE's and DiT's layout)."""
    w = [1.0, 10000 ** -0.5]

    def axis(pos: int) -> list[float]:
        return [math.sin(pos * w[0]), math.sin(pos * w[1]), math.cos(pos * w[0]),
                math.cos(pos * w[1])]

    expected = torch.tensor([axis(j) + axis(i) for i in range(2) for j in range(2)])
    torch.testing.assert_close(sincos_2d(8, 2), expected)
    model = _dit(hidden_size=8, input_size=4, patch_size=2)
    torch.testing.assert_close(model.pos_embed[0], expected)
    assert "pos_embed" not in model.state_dict()  # fixed: a function of the sizes


def test_a_learned_position_embedding_is_a_trained_parameter() -> None:
    model = _dit(pos_embed="learned")
    assert model.pos_embed.requires_grad and model.state_dict()["pos_embed"].shape == (1, 16, 16)
    _randomise(model)(**_inputs(model)).square().mean().backward()
    assert model.pos_embed.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"input_size": 10, "patch_size": 4}, "input_size 10 is not divisible by patch_size 4"),
        ({"patch_size": 3}, r"patch_size must be one of \(1, 2, 4, 8\)"),
        ({"num_heads": 3}, "not divisible by num_heads 3"),
        ({"pos_embed": "rope"}, "pos_embed='rope' is unknown"),
        ({"hidden_size": 18, "num_heads": 2}, "sin-cos embedding needs a width divisible by 4"),
    ],
)
def test_bad_config_raises(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _dit(**overrides)


def test_bad_inputs_raise() -> None:
    model = _dit()
    t = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="input is 10x10; this DiT takes square inputs whose "
                       "side is a multiple of its patch_size 4"):
        _dit(patch_size=4)(torch.randn(2, 3, 10, 10), t)
    with pytest.raises(ValueError, match="input is 8x16; this DiT takes square inputs"):
        model(torch.randn(2, 3, 8, 16), t)
    with pytest.raises(ValueError, match="this DiT has no cross-attention"):
        model(torch.randn(2, 3, 8, 8), t, context=torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="class_labels are required"):
        model(torch.randn(2, 3, 8, 8), t, class_labels=t)


def test_a_larger_canvas_gets_the_sincos_embedding_of_a_dit_built_for_it() -> None:
    """Sin-cos positions are recomputed for the larger grid: a DiT built for 8 and called on 16
    is the DiT built for 16 with the same weights."""
    torch.manual_seed(0)
    small = _randomise(_dit(num_classes=5, context_dim=6)).eval()
    large = _dit(num_classes=5, context_dim=6, input_size=16).eval()
    large.load_state_dict(small.state_dict())
    inputs = {**_inputs(small), "x": torch.randn(2, 3, 16, 16)}
    assert torch.equal(small(**inputs), large(**inputs))
    assert torch.equal(small.positions(4), small.pos_embed)


def test_a_learned_embedding_is_resized_bicubically_keeping_its_layout() -> None:
    """Channel 0 holds the token's row, channel 1 its column, channel 2 a constant: resized from
    a 4x4 to an 8x8 grid, the rows stay rows (constant along a row, increasing down), the columns
    columns, and the constant constant (ViT's 2-D interpolation)."""
    model = _dit(pos_embed="learned")  # input 8, patch 2: a 4x4 grid
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    with torch.no_grad():
        model.pos_embed.zero_()
        model.pos_embed[0, :, 0], model.pos_embed[0, :, 1] = rows.flatten(), cols.flatten()
        model.pos_embed[0, :, 2] = 0.7
    grid = model.positions(8)[0].reshape(8, 8, 16)
    assert grid.shape == (8, 8, 16) and torch.equal(model.positions(4), model.pos_embed)
    torch.testing.assert_close(grid[..., 0], grid[:, :1, 0].expand(8, 8))
    torch.testing.assert_close(grid[..., 1], grid[:1, :, 1].expand(8, 8))
    torch.testing.assert_close(grid[..., 1], grid[..., 0].T)
    assert (grid[1:, 0, 0] > grid[:-1, 0, 0]).all()
    assert grid[0, 0, 0] < 0.5 and grid[-1, 0, 0] > 2.5  # the trained range 0..3, stretched
    torch.testing.assert_close(grid[..., 2], torch.full((8, 8), 0.7))
    torch.testing.assert_close(grid[..., 3:], torch.zeros(8, 8, 13))
    out = _randomise(model)(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
    assert out.shape == (2, 3, 16, 16)


def test_input_multiple_is_the_patch_size() -> None:
    assert DiT.input_multiple({"patch_size": 4})[0] == 4
    assert DiT.input_multiple({})[0] == 2  # the default patch size


def test_class_labels_and_context_change_the_output() -> None:
    torch.manual_seed(0)
    model = _randomise(_dit(num_classes=5, context_dim=6)).eval()
    inputs = _inputs(model)
    out = model(**inputs)
    other_labels = {**inputs, "class_labels": (inputs["class_labels"] + 1) % 5}
    other_context = {**inputs, "context": torch.randn_like(inputs["context"])}
    assert not torch.allclose(model(**other_labels), out, atol=1e-4)
    assert not torch.allclose(model(**other_context), out, atol=1e-4)
    # Float timesteps (flow matching, EDM) as well as integers.
    assert not torch.allclose(model(**{**inputs, "timesteps": inputs["timesteps"] + 0.5}), out)


@pytest.mark.parametrize("name", ["plain", "both"])
def test_gradient_checkpointing_gives_identical_gradients(name: str) -> None:
    torch.manual_seed(0)
    plain = _randomise(_dit(**CONDITIONS[name]))
    ckpt = _dit(**CONDITIONS[name], use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    recomputed = []
    ckpt.blocks[0].mlp.register_forward_hook(lambda *_: recomputed.append(1))
    inputs = _inputs(plain)
    grads = []
    for model in (plain, ckpt):
        model.train()
        model(**inputs).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert len(recomputed) == 2  # forward plus recomputation in backward
    for n, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][n], atol=1e-6, rtol=1e-5, msg=n)


def test_compiles_as_one_graph() -> None:
    """No data-dependent Python control flow: dynamo traces the forward without a break."""
    torch.manual_seed(0)
    model = _randomise(_dit(**CONDITIONS["both"])).eval()
    inputs = _inputs(model)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(**inputs), model(**inputs))


def test_bf16_autocast_close_to_fp32() -> None:
    torch.manual_seed(0)
    model = _randomise(_dit(**CONDITIONS["both"]))
    inputs = _inputs(model)
    ref = model(**inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs)
    assert (out.float() - ref).norm() / ref.norm() < 0.05


def test_the_position_embedding_is_built_where_the_module_is() -> None:
    with torch.device("meta"):
        model = _dit()
    assert model.pos_embed.device.type == "meta"
    assert _dit().pos_embed.device.type == "cpu"
