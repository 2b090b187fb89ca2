"""Regional compilation (``model.compile={regional: true}``): every block compiled in place, the
same outputs, gradients and parameter names as eager, and no block left eager by dynamo's
recompile limit."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ldm_lightning.models.speed import apply_speed_switches, compile_regions
from ldm_lightning.nn.dit import DiT
from ldm_lightning.nn.unet import UNetModel
from tests.nn.test_unet import _randomise

# Four levels and two ResBlocks a level: 27 regions, blocks of 14 shapes (dynamo's default
# recompile limit is 8).
UNET = {
    "in_channels": 3, "out_channels": 3, "model_channels": 8, "num_res_blocks": 2,
    "attention_resolutions": [2, 4], "channel_mult": (1, 2, 3, 4), "num_head_channels": 4,
}


def compiled_and_eager(net: nn.Module) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    eager = _randomise(net)
    compiled = copy.deepcopy(eager)
    apply_speed_switches([compiled], {"regional": True, "backend": "aot_eager"}, False)
    return compiled, eager


def loss_and_grads(net: nn.Module, *inputs: torch.Tensor) -> tuple[torch.Tensor, list]:
    out = net(*inputs)
    out.square().mean().backward()
    return out.detach(), [p.grad for p in net.parameters()]


def test_regional_compile_of_the_unet_matches_eager_with_every_block_compiled() -> None:
    compiled, eager = compiled_and_eager(UNetModel(**UNET))
    regions = compile_regions(compiled)
    assert len(regions) == 1 + 12 + 1 + 12 + 1  # time MLP, input, middle, output blocks, out
    assert all(region._compiled_call_impl is not None for region in regions)
    assert compiled._compiled_call_impl is None  # the blocks, not the whole net
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints interchange
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        out, grads = loss_and_grads(compiled, x, t)
    expected, expected_grads = loss_and_grads(eager, x, t)
    torch.testing.assert_close(out, expected)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)


def test_regional_compile_of_the_dit_compiles_its_blocks() -> None:
    dit = DiT(input_size=8, in_channels=3, out_channels=3, patch_size=2, hidden_size=16, depth=3,
              num_heads=2)
    compiled, eager = compiled_and_eager(dit)
    assert [type(r).__name__ for r in compile_regions(compiled)] == [
        "TimestepEmbedder", "DiTBlock", "DiTBlock", "DiTBlock", "FinalLayer"
    ]
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    torch.testing.assert_close(loss_and_grads(compiled, x, t)[0], loss_and_grads(eager, x, t)[0])
    assert list(compiled.state_dict()) == list(eager.state_dict())


def test_a_net_without_regions_is_compiled_whole() -> None:
    net = nn.Sequential(nn.Linear(2, 2))
    assert compile_regions(net) == [net]
