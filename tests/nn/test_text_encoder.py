"""Transformer text encoder: shapes, EOT pooling, padding invariance, final LayerNorm."""

import pytest
import torch

from ldm_lightning.nn.text_encoder import TextEncoder


@pytest.fixture
def encoder() -> TextEncoder:
    return TextEncoder(vocab_size=50, context_length=12, width=16, layers=2, heads=2).eval()


def tokens(rows: list[list[int]], length: int) -> torch.Tensor:
    out = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row)
    return out


def test_context_and_pooled_shapes_and_eot_pooling(encoder):
    ids = tokens([[1, 7, 9, 2], [1, 2], [1, 5, 6, 7, 8, 2]], 12)
    context, pooled = encoder(ids)
    assert context.shape == (3, 12, 16) and pooled.shape == (3, 16)
    for row, eos in enumerate([3, 1, 5]):
        torch.testing.assert_close(pooled[row], context[row, eos])


def test_outputs_of_real_tokens_do_not_depend_on_padding(encoder):
    short, long = tokens([[1, 7, 9, 2]], 6), tokens([[1, 7, 9, 2]], 12)
    context_short, pooled_short = encoder(short)
    context_long, pooled_long = encoder(long)
    torch.testing.assert_close(context_short[:, :4], context_long[:, :4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled_short, pooled_long, atol=1e-5, rtol=1e-5)


def test_final_layer_norm_gives_zero_mean_unit_variance_tokens(encoder):
    context, _ = encoder(tokens([[1, 3, 4, 2]], 12))
    torch.testing.assert_close(context.mean(-1), torch.zeros(1, 12), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        context.var(-1, unbiased=False), torch.ones(1, 12), atol=1e-3, rtol=0
    )


def test_bad_token_tensors_are_errors(encoder):
    with pytest.raises(ValueError, match="end-of-text"):
        encoder(tokens([[1, 7, 9]], 12))
    with pytest.raises(ValueError, match="L <= 12"):
        encoder(tokens([[1, 2]], 13))
