"""VectorQuantizer: VQ-VAE loss, straight-through gradient, EMA codebook, dead codes, DDP sync."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ldm_lightning.nn.quantizer import VectorQuantizer


def _quantizer(codebook: torch.Tensor, **kwargs) -> VectorQuantizer:
    vq = VectorQuantizer(codebook.shape[0], codebook.shape[1], **kwargs)
    with torch.no_grad():
        vq.embedding.weight.copy_(codebook)
        if vq.use_ema:
            vq.ema_embed_sum.copy_(codebook)
    return vq


def _nearest_codes(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    return torch.cdist(flat, codebook).argmin(dim=1)


def test_loss_and_gradients_follow_vq_vae_eq3():
    codebook = torch.randn(8, 3)
    vq = _quantizer(codebook, beta=0.25)
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    z_q, loss, info = vq(z)

    idx = _nearest_codes(z.detach(), codebook)
    e = codebook[idx].view(2, 4, 4, 3).permute(0, 3, 1, 2)
    mse = (z.detach() - e).square().mean()
    torch.testing.assert_close(loss.detach(), 1.25 * mse)
    torch.testing.assert_close(info["codebook_loss"], mse)
    torch.testing.assert_close(info["commitment_loss"], mse)
    torch.testing.assert_close(info["indices"], idx.view(2, 4, 4))
    torch.testing.assert_close(z_q.detach(), e)

    loss.backward()
    n = z.numel()
    # Only the commitment term reaches the encoder, scaled by beta (taming's legacy swap would
    # give the encoder the unscaled term); the codebook term moves the codes towards z.
    torch.testing.assert_close(z.grad, 0.25 * 2 * (z.detach() - e) / n)
    flat_z = z.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    expected_code_grad = torch.zeros_like(codebook).index_add_(
        0, idx, 2 * (codebook[idx] - flat_z) / n
    )
    torch.testing.assert_close(vq.embedding.weight.grad, expected_code_grad)


def test_straight_through_passes_gradient_unchanged():
    vq = VectorQuantizer(16, 4)
    z = torch.randn(1, 4, 3, 3, requires_grad=True)
    z_q, _, _ = vq(z)
    weights = torch.randn_like(z)
    (z_q * weights).sum().backward()
    torch.testing.assert_close(z.grad, weights)


def test_lookup_reproduces_forward_codes():
    vq = VectorQuantizer(16, 4)
    z_q, _, info = vq(torch.randn(2, 4, 3, 5))
    torch.testing.assert_close(vq.lookup(info["indices"]), z_q.detach())
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        vq.lookup(info["indices"].flatten())


def test_ema_update_matches_hand_computation():
    decay, eps = 0.5, 1e-3
    vq = _quantizer(torch.tensor([[0.0], [10.0]]), use_ema=True, ema_decay=decay, ema_eps=eps)
    assert not vq.embedding.weight.requires_grad
    z = torch.tensor([1.0, 2.0, 9.0]).view(1, 1, 1, 3)
    vq.train()
    _, loss, info = vq(z)

    # Codes: 1, 2 -> e_0 = 0; 9 -> e_1 = 10. EMA loss is the commitment term only.
    commitment = torch.tensor((1.0 + 4.0 + 1.0) / 3)
    torch.testing.assert_close(loss, 0.25 * commitment)
    n = decay * torch.tensor([1.0, 1.0]) + (1 - decay) * torch.tensor([2.0, 1.0])
    m = decay * torch.tensor([0.0, 10.0]) + (1 - decay) * torch.tensor([3.0, 9.0])
    smoothed = (n + eps) / (n.sum() + 2 * eps) * n.sum()
    torch.testing.assert_close(vq.ema_cluster_size, n)
    torch.testing.assert_close(vq.ema_embed_sum, m[:, None])
    torch.testing.assert_close(vq.embedding.weight, (m / smoothed)[:, None])
    assert info["indices"].tolist() == [[[0, 0, 1]]]


def test_dead_codes_are_restarted_from_batch_outputs():
    codebook = torch.tensor([[0.0, 0.0], [50.0, 50.0], [60.0, 60.0], [-70.0, 0.0]])
    vq = _quantizer(codebook, restart_dead_codes=True, dead_code_threshold=1.0)
    z = 0.1 * torch.randn(1, 2, 4, 4, requires_grad=True)
    vq.train()
    _, loss, _ = vq(z)
    loss.backward()  # the in-place restart must not break the backward pass

    rows = z.detach().permute(0, 2, 3, 1).reshape(-1, 2)
    weight = vq.embedding.weight.detach()
    torch.testing.assert_close(weight[0], codebook[0])
    for code in weight[1:]:
        assert (rows - code).abs().amax(dim=1).min() == 0, "restarted code is not a batch output"
    # usage: d * 1 + (1 - d) * 16 for the used code, reset to the threshold for restarted ones.
    torch.testing.assert_close(vq.code_usage, torch.tensor([0.99 + 0.16, 1.0, 1.0, 1.0]))


def test_perplexity_of_uniform_use_equals_number_of_used_codes():
    codebook = torch.eye(8)
    vq = _quantizer(codebook)
    z = codebook[torch.arange(4).repeat(3)].T.reshape(1, 8, 3, 4)  # codes 0..3, 3 times each
    _, _, info = vq(z)
    torch.testing.assert_close(info["perplexity"], torch.tensor(4.0))
    torch.testing.assert_close(info["usage"], torch.tensor(0.5))


def test_eval_mode_and_no_grad_leave_codebook_and_buffers_unchanged():
    vq = VectorQuantizer(8, 2, use_ema=True, restart_dead_codes=True)
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq.eval()
    vq(torch.randn(2, 2, 4, 4))
    vq.train()
    with torch.no_grad():  # e.g. image logging while the module is in train mode
        vq(torch.randn(2, 2, 4, 4))
    for key, value in vq.state_dict().items():
        torch.testing.assert_close(value, before[key])
    vq(torch.randn(2, 2, 4, 4))
    assert not torch.equal(vq.ema_cluster_size, before["ema_cluster_size"])


def test_state_dict_keys_match_compvis_unless_options_add_buffers():
    assert set(VectorQuantizer(8, 2).state_dict()) == {"embedding.weight"}
    keys = set(VectorQuantizer(8, 2, use_ema=True, restart_dead_codes=True).state_dict())
    assert keys == {"embedding.weight", "ema_cluster_size", "ema_embed_sum", "code_usage"}


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="embed_dim"):
        VectorQuantizer(8, 4)(torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match="ema_decay"):
        VectorQuantizer(8, 4, ema_decay=1.0)


def _ddp_worker(rank: int, world_size: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    torch.manual_seed(0)  # same initial codebook on both ranks
    vq = VectorQuantizer(8, 2, use_ema=True, restart_dead_codes=True, dead_code_threshold=0.5)
    torch.manual_seed(100 + rank)  # different data and restart draws on each rank
    z = torch.randn(4, 2, 4, 4) + 3 * rank
    vq.train()
    vq(z)
    torch.save({"state": vq.state_dict(), "z": z}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_ema_and_restarts_stay_identical_across_ddp_ranks(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for key in r0["state"]:
        torch.testing.assert_close(r0["state"][key], r1["state"][key])

    # Single-process reference on both ranks' data: same EMA statistics (restart off).
    torch.manual_seed(0)
    ref = VectorQuantizer(8, 2, use_ema=True)
    ref.train()
    ref(torch.cat([r0["z"], r1["z"]]))
    restarted = r0["state"]["code_usage"] == 0.5
    kept = ~restarted
    assert kept.any() and restarted.any()
    rank0_rows = r0["z"].permute(0, 2, 3, 1).reshape(-1, 2)
    for code in r0["state"]["embedding.weight"][restarted]:
        assert (rank0_rows - code).abs().amax(dim=1).min() == 0, "restart not from rank 0"
    torch.testing.assert_close(r0["state"]["ema_cluster_size"][kept], ref.ema_cluster_size[kept])
    torch.testing.assert_close(r0["state"]["ema_embed_sum"][kept], ref.ema_embed_sum[kept])
