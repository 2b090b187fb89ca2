"""Diagonal Gaussian posterior of the KL autoencoder (VAE, Kingma & Welling 2014; LDM sec. 3.1)."""

import torch
from torch import Tensor


class DiagonalGaussian:
    """``q(z|x) = N(mu, diag(sigma^2))`` from the encoder's moments.

    Args:
        moments: ``[B, 2C, H, W]``, mean in the first C channels and log-variance in the last C
            (CompVis' ``DiagonalGaussianDistribution`` layout). The log-variance is clamped to
            ``[-30, 20]`` so that ``exp`` neither underflows to a zero std nor overflows.
    """

    def __init__(self, moments: Tensor) -> None:
        if moments.ndim != 4 or moments.shape[1] % 2:
            raise ValueError(
                f"moments must have shape [B, 2C, H, W] (mean and log-variance stacked on "
                f"channels), got {tuple(moments.shape)}; build the encoder with double_z=True"
            )
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Reparameterised sample ``mu + sigma * eps``, ``eps ~ N(0, I)`` (VAE sec. 2.4).

        Returns:
            ``[B, C, H, W]`` latent; gradients flow to the moments.
        """
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        """The mean ``mu``, the most likely latent: [B, C, H, W]."""
        return self.mean

    def kl(self) -> Tensor:
        """``KL(q || N(0, I))`` per sample, summed over C, H, W: [B].

        ``0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2)`` (VAE appendix B).
        """
        return 0.5 * (self.mean.square() + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))
