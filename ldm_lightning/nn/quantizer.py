"""Vector quantiser of the VQ autoencoder (VQ-VAE, van den Oord et al. 2017; LDM sec. 3.1).

Each latent vector ``z`` ([D] at every position of ``[B, D, H, W]``) is replaced by its nearest
codebook entry ``e_k``, ``k = argmin_j ||z - e_j||^2`` (VQ-VAE eq. 1-2). The codebook is
either learned by gradient (VQ-VAE eq. 3) or by exponential moving averages of the assigned
encoder outputs (VQ-VAE appendix A.1; Razavi et al. 2019). Codes nobody uses can be restarted
from current encoder outputs, a common fix for codebook collapse.

Under DDP (``torch.distributed`` initialised) the statistics that change the codebook are
summed over ranks and restarted codes are broadcast from rank 0, so every rank keeps an
identical codebook.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce_sum(t: Tensor) -> Tensor:
    if _distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantiser with straight-through gradients.

    Args:
        n_embed: codebook size K.
        embed_dim: code width D (channels of the latent).
        beta: commitment weight (VQ-VAE eq. 3; 0.25 in the paper and in LDM).
        use_ema: learn the codebook by EMA instead of gradients. With EMA the codebook term
            of the loss is dropped and ``embedding.weight`` does not require grad.
        ema_decay: decay ``d`` of the EMA codebook and of the usage counter.
        ema_eps: Laplace smoothing of the EMA cluster sizes.
        restart_dead_codes: in training, re-initialise codes whose EMA usage falls below
            ``dead_code_threshold`` with random encoder outputs of the current batch.
        dead_code_threshold: usage, in assignments per batch (EMA with decay ``ema_decay``),
            under which a code counts as dead. Usage starts at this threshold, so a code that
            is never chosen is restarted after its first training step.

    The codebook is ``embedding.weight`` ([K, D]), the name CompVis stores as
    ``quantize.embedding.weight``. EMA and usage buffers exist only when their option is on,
    so a plain quantiser loads CompVis checkpoints with ``strict=True``.

    EMA and restart updates happen only in training mode with gradients enabled, so
    evaluation and no-grad passes (image logging, encoding for a later stage) never change
    the codebook.
    """

    def __init__(
        self,
        n_embed: int,
        embed_dim: int,
        beta: float = 0.25,
        use_ema: bool = False,
        ema_decay: float = 0.99,
        ema_eps: float = 1e-5,
        restart_dead_codes: bool = False,
        dead_code_threshold: float = 1.0,
    ) -> None:
        super().__init__()
        if n_embed < 1 or embed_dim < 1:
            raise ValueError(f"n_embed and embed_dim must be >= 1, got {n_embed}, {embed_dim}")
        if not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1), got {ema_decay}; 0.99 is usual")
        self.n_embed = n_embed
        self.embed_dim = embed_dim
        self.beta = beta
        self.use_ema = use_ema
        self.ema_decay = ema_decay
        self.ema_eps = ema_eps
        self.restart_dead_codes = restart_dead_codes
        self.dead_code_threshold = dead_code_threshold

        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)
        if use_ema:
            self.embedding.weight.requires_grad_(False)
            # N_i = 1 and m_i = e_i make the initial EMA estimate m_i / N_i equal the codebook.
            self.register_buffer("ema_cluster_size", torch.ones(n_embed))
            self.register_buffer("ema_embed_sum", self.embedding.weight.detach().clone())
        if restart_dead_codes:
            self.register_buffer("code_usage", torch.full((n_embed,), float(dead_code_threshold)))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Quantise ``z`` [B, D, H, W].

        Loss (VQ-VAE eq. 3, means over all elements)::

            L = ||sg[z] - e||^2 + beta * ||z - sg[e]||^2      (gradient codebook)
            L = beta * ||z - sg[e]||^2                         (EMA codebook)

        The output is ``z + sg[z_q - z]`` (straight-through estimator, VQ-VAE sec. 3.1): its
        value is ``z_q`` and its gradient passes to ``z`` unchanged.

        Returns:
            ``z_q`` [B, D, H, W] in ``z``'s dtype, the scalar loss, and ``info`` with
            ``indices`` [B, H, W] (long), ``perplexity`` (exp of the entropy of this batch's code
            histogram), ``usage`` (fraction of codes used in this batch), ``codebook_loss`` and
            ``commitment_loss`` (detached scalars).
        """
        if z.ndim != 4 or z.shape[1] != self.embed_dim:
            raise ValueError(
                f"expected z of shape [B, {self.embed_dim}, H, W], got {tuple(z.shape)}; "
                "embed_dim must equal the channels of the latent"
            )
        b, d, h, w = z.shape
        # Distances and codebook statistics in float32: under bf16 autocast, argmin over nearly
        # equal distances and EMA sums lose too much precision.
        with torch.autocast(device_type=z.device.type, enabled=False):
            z_flat = z.float().permute(0, 2, 3, 1).reshape(-1, d)  # [N, D]
            flat = z_flat.detach()
            indices = self._nearest(flat)
            z_q = self.embedding(indices)  # [N, D]
            codebook_loss = F.mse_loss(z_q, flat)
            commitment_loss = F.mse_loss(z_flat, z_q.detach())
            loss = self.beta * commitment_loss
            if not self.use_ema:
                loss = loss + codebook_loss

            counts = torch.bincount(indices, minlength=self.n_embed).float()  # [K]
            # Only a training forward that builds a graph moves the codebook: image logging
            # and other inference passes often run in train mode under no_grad.
            learning = self.training and torch.is_grad_enabled()
            if learning and (self.use_ema or self.restart_dead_codes):
                self._update_codebook(flat, indices, counts)

        z_q = z_q.view(b, h, w, d).permute(0, 3, 1, 2).to(z.dtype)
        z_q = z + (z_q - z).detach()
        probs = counts / counts.sum()
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
        info = {
            "indices": indices.view(b, h, w),
            "perplexity": entropy.exp(),
            "usage": (counts > 0).float().mean(),
            "codebook_loss": codebook_loss.detach(),
            "commitment_loss": commitment_loss.detach(),
        }
        return z_q, loss, info

    def lookup(self, indices: Tensor) -> Tensor:
        """Codebook vectors for ``indices`` [B, H, W] (long) as ``z_q`` [B, D, H, W]."""
        if indices.ndim != 3:
            raise ValueError(f"indices must have shape [B, H, W], got {tuple(indices.shape)}")
        return self.embedding(indices).permute(0, 3, 1, 2)

    @torch.no_grad()
    def _nearest(self, flat: Tensor) -> Tensor:
        """Index of the closest code for each row of ``flat`` [N, D], by squared L2 distance."""
        codebook = self.embedding.weight.float()
        dist2 = (
            flat.square().sum(1, keepdim=True)
            - 2.0 * flat @ codebook.t()
            + codebook.square().sum(1)[None, :]
        )
        return dist2.argmin(dim=1)

    @torch.no_grad()
    def _update_codebook(self, flat: Tensor, indices: Tensor, counts: Tensor) -> None:
        """EMA codebook step and dead-code restart, from this batch summed over all ranks."""
        decay = self.ema_decay
        global_counts = _all_reduce_sum(counts.clone())
        if self.use_ema:
            # VQ-VAE appendix A.1: N_i <- d N_i + (1-d) n_i,  m_i <- d m_i + (1-d) sum_{k(z)=i} z,
            # e_i = m_i / N~_i with N~ the Laplace-smoothed cluster sizes.
            sums = torch.zeros_like(self.ema_embed_sum).index_add_(0, indices, flat)
            _all_reduce_sum(sums)
            self.ema_cluster_size.mul_(decay).add_(global_counts, alpha=1 - decay)
            self.ema_embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
            total = self.ema_cluster_size.sum()
            smoothed = (
                (self.ema_cluster_size + self.ema_eps)
                / (total + self.n_embed * self.ema_eps)
                * total
            )
            self.embedding.weight.copy_(self.ema_embed_sum / smoothed[:, None])
        if self.restart_dead_codes:
            self.code_usage.mul_(decay).add_(global_counts, alpha=1 - decay)
            self._restart(flat, self.code_usage < self.dead_code_threshold)

    def _restart(self, flat: Tensor, dead: Tensor) -> None:
        """Replace the codes in the mask ``dead`` [K] by random rows of ``flat`` [N, D]."""
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        picks = torch.randint(0, flat.shape[0], (n_dead,), device=flat.device)
        new_codes = flat[picks].to(self.embedding.weight.dtype)
        if _distributed():
            # Each rank drew from its own batch; rank 0's draw keeps the codebooks identical.
            dist.broadcast(new_codes, src=0)
        self.embedding.weight[dead] = new_codes
        # A restarted code starts as alive as a fresh one: usage at the threshold and, with EMA,
        # the same N_i = 1, m_i = e_i state as at initialisation.
        self.code_usage[dead] = float(self.dead_code_threshold)
        if self.use_ema:
            self.ema_cluster_size[dead] = 1.0
            self.ema_embed_sum[dead] = new_codes
