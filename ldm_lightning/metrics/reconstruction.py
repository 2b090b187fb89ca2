"""Reconstruction quality of an autoencoder over a dataset: PSNR, SSIM, LPIPS, codebook usage.

``x`` and ``x' = D(E(x))`` are ``[B, 3, H, W]`` in [-1, 1]. PSNR (``10 log10(1 / MSE)`` over
all pixels in [0, 1]) and SSIM (Wang et al. 2004) are torchmetrics'; LPIPS (Zhang et al. 2018)
is the mean distance per image; codebook usage is the fraction of VQ codes used at least once
and perplexity ``exp(H(p))`` of the code frequencies ``p`` (VQ-VAE).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure


class ReconstructionMetrics:
    """Accumulates over batches; ``compute()`` -> ``{"psnr", "ssim", "lpips", "codebook_usage",
    "perplexity", "num_images"}`` (LPIPS only with a network, codebook only with indices)."""

    def __init__(self, lpips: nn.Module | None = None, n_embed: int | None = None) -> None:
        self.psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.lpips = lpips
        self.lpips_sum = 0.0
        self.n_embed = n_embed
        self.code_counts = torch.zeros(n_embed or 0, dtype=torch.long)
        self.num_images = 0

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, indices: Tensor | None = None) -> None:
        """``x``, ``x_hat``: ``[B, 3, H, W]`` in [-1, 1]; ``indices``: VQ codes of the batch."""
        x, x_hat = x.float(), x_hat.float().clamp(-1, 1)
        x01, x_hat01 = ((x + 1) / 2).cpu(), ((x_hat + 1) / 2).cpu()
        self.psnr.update(x_hat01, x01)
        self.ssim.update(x_hat01, x01)
        if self.lpips is not None:
            self.lpips_sum += float(self.lpips(x, x_hat).sum())
        if indices is not None:
            if self.n_embed is None:
                raise ValueError("codebook indices were given, but n_embed was not")
            counts = torch.bincount(indices.flatten().cpu(), minlength=self.n_embed)
            self.code_counts += counts
        self.num_images += x.shape[0]

    def compute(self) -> dict[str, float | int]:
        if self.num_images == 0:
            raise ValueError("no images were evaluated; check that the split is not empty")
        results: dict[str, float | int] = {
            "psnr": float(self.psnr.compute()),
            "ssim": float(self.ssim.compute()),
        }
        if self.lpips is not None:
            results["lpips"] = self.lpips_sum / self.num_images
        if self.code_counts.sum() > 0:
            probs = self.code_counts.double() / self.code_counts.sum()
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
            results["codebook_usage"] = float((self.code_counts > 0).double().mean())
            results["perplexity"] = float(entropy.exp())
        results["num_images"] = self.num_images
        return results
