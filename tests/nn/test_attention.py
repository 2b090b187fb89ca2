"""Attention layers against hand-written softmax attention; zero init; normalisation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm_lightning.nn.attention import (
    GEGLU,
    AttentionBlock,
    BasicTransformerBlock,
    CrossAttention,
    FeedForward,
    SpatialTransformer,
    maybe_checkpoint,
    normalization,
)


def _randomise(module: nn.Module) -> nn.Module:
    """Replace every parameter (zero-initialised ones included) by small random values."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3)
    return module


def _manual_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int
) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V per head; q [B, N, h*d], k/v [B, L, h*d] -> [B, N, h*d]."""
    outs = []
    d = q.shape[-1] // heads
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        weights = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / d**0.5, dim=-1)
        outs.append(weights @ v[..., sl])
    return torch.cat(outs, dim=-1)


def test_cross_attention_equals_manual_softmax() -> None:
    attn = CrossAttention(query_dim=8, context_dim=6, heads=2, dim_head=4)
    x, ctx = torch.randn(2, 5, 8), torch.randn(2, 3, 6)
    q = x @ attn.to_q.weight.T
    k, v = ctx @ attn.to_k.weight.T, ctx @ attn.to_v.weight.T
    expected = _manual_attention(q, k, v, heads=2) @ attn.to_out[0].weight.T + attn.to_out[0].bias
    assert torch.allclose(attn(x, ctx), expected, atol=1e-6)


def test_cross_attention_without_context_is_self_attention() -> None:
    attn = CrossAttention(query_dim=8, heads=2, dim_head=4)
    x = torch.randn(2, 5, 8)
    assert torch.allclose(attn(x), attn(x, x))
    assert attn.to_q.bias is None and attn.to_k.bias is None and attn.to_v.bias is None


def test_cross_attention_rejects_wrong_context_width() -> None:
    attn = CrossAttention(query_dim=8, context_dim=6, heads=2, dim_head=4)
    with pytest.raises(ValueError, match="width 5 .* expects 6"):
        attn(torch.randn(1, 4, 8), torch.randn(1, 3, 5))


def test_geglu_and_feedforward_closed_form() -> None:
    geglu = GEGLU(4, 3)
    x = torch.randn(2, 4)
    a, g = (x @ geglu.proj.weight.T + geglu.proj.bias).split(3, dim=-1)
    assert torch.allclose(geglu(x), a * F.gelu(g), atol=1e-6)

    ff = FeedForward(4, mult=2)
    assert isinstance(ff.net[0], GEGLU) and isinstance(ff.net[1], nn.Dropout)
    assert ff.net[2].in_features == 8 and ff.net[2].out_features == 4
    assert torch.allclose(ff(x), ff.net[2](ff.net[0](x)))


def test_transformer_block_is_pre_norm_residual() -> None:
    block = BasicTransformerBlock(dim=8, n_heads=2, d_head=4, context_dim=6)
    x, ctx = torch.randn(2, 5, 8), torch.randn(2, 3, 6)
    h = x + block.attn1(block.norm1(x))
    h = h + block.attn2(block.norm2(h), ctx)
    h = h + block.ff(block.norm3(h))
    assert torch.allclose(block(x, ctx), h, atol=1e-6)


def test_spatial_transformer_starts_as_identity_then_uses_context() -> None:
    st = SpatialTransformer(16, n_heads=2, d_head=4, depth=2, context_dim=6)
    x = torch.randn(2, 16, 4, 4)
    ctx = torch.randn(2, 3, 6, requires_grad=True)
    assert torch.equal(st(x, ctx), x)

    _randomise(st)
    out = st(x, ctx)
    assert not torch.allclose(out, st(x, torch.randn(2, 3, 6)), atol=1e-3)
    out.square().sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0


def test_spatial_transformer_without_context_is_self_attention() -> None:
    st = _randomise(SpatialTransformer(8, n_heads=2, d_head=4))
    x = torch.randn(1, 8, 2, 3)
    block = st.transformer_blocks[0]
    tokens = st.proj_in(st.norm(x)).flatten(2).transpose(1, 2)
    tokens = tokens + block.attn1(block.norm1(tokens))
    normed = block.norm2(tokens)
    tokens = tokens + block.attn2(normed, normed)  # the second attention over the tokens too
    tokens = tokens + block.ff(block.norm3(tokens))
    expected = x + st.proj_out(tokens.transpose(1, 2).reshape(1, 8, 2, 3))
    assert torch.allclose(st(x), expected, atol=1e-5)


def test_attention_block_equals_manual_legacy_head_order() -> None:
    block = _randomise(AttentionBlock(8, num_heads=2))
    x = torch.randn(2, 8, 3, 3)
    flat = x.reshape(2, 8, 9)
    normed = F.group_norm(flat, 8, block.norm.weight, block.norm.bias, eps=1e-5)
    qkv = torch.einsum("oc,bct->bot", block.qkv.weight[:, :, 0], normed) + block.qkv.bias[:, None]
    # openai/CompVis "legacy" layout: channels [q0 k0 v0 | q1 k1 v1], 4 channels each
    heads = []
    for h in range(2):
        q, k, v = (qkv[:, 12 * h + 4 * i : 12 * h + 4 * (i + 1)] for i in range(3))
        w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / 2.0, dim=-1)
        heads.append(torch.einsum("bts,bcs->bct", w, v))
    attn = torch.cat(heads, dim=1)
    out = torch.einsum("oc,bct->bot", block.proj_out.weight[:, :, 0], attn)
    expected = (flat + out + block.proj_out.bias[:, None]).reshape(2, 8, 3, 3)
    assert torch.allclose(block(x), expected, atol=1e-5)


def test_attention_block_head_settings() -> None:
    x = torch.randn(1, 8, 2, 2)
    assert torch.equal(AttentionBlock(8, num_heads=2)(x), x)  # zero-initialised proj_out
    assert AttentionBlock(8, num_head_channels=2).num_heads == 4
    with pytest.raises(ValueError, match="num_head_channels 3"):
        AttentionBlock(8, num_head_channels=3)
    with pytest.raises(ValueError, match="num_heads 3"):
        AttentionBlock(8, num_heads=3)


def test_normalization_groups_and_float32_statistics() -> None:
    assert normalization(64).num_groups == 32
    assert normalization(8).num_groups == 8
    assert normalization(48).num_groups == 16
    norm = normalization(4)
    x = (torch.randn(2, 4, 5, 5) * 100 + 50).bfloat16()
    out = norm(x)
    expected = F.group_norm(x.float(), 4, norm.weight, norm.bias, eps=1e-5).bfloat16()
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)


def test_maybe_checkpoint_recomputes_with_same_gradients() -> None:
    lin = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Tanh())
    calls = []
    lin[0].register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(3, 4, requires_grad=True)
    grads = []
    for enabled in (False, True):
        torch.manual_seed(1)
        maybe_checkpoint(lin, x, enabled=enabled).sum().backward()
        grads.append(x.grad.clone())
        x.grad = None
    assert len(calls) == 3  # one plain forward, one checkpointed forward plus its recomputation
    assert torch.equal(grads[0], grads[1])
