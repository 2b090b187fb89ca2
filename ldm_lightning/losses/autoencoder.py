"""Autoencoder training loss: reconstruction + LPIPS + PatchGAN + regulariser (LDM sec. 3.1).

Merges taming's ``VQLPIPSWithDiscriminator`` (Esser et al. 2021) and CompVis'
``LPIPSWithDiscriminator`` into one module with a ``regularizer`` switch. The generator
(autoencoder) and the discriminator are optimised in alternating steps, so the two losses are
separate methods.
"""

from collections.abc import Callable, Collection

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm_lightning.nn.discriminator import NLayerDiscriminator

Perceptual = Callable[[Tensor, Tensor], Tensor]

_REC_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "l1": lambda x, x_hat: (x - x_hat).abs(),
    "l2": lambda x, x_hat: (x - x_hat).square(),
}


def _hinge(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def _vanilla(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


_DISC_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "hinge": _hinge,
    "vanilla": _vanilla,
}
_REGULARIZERS = ("vq", "kl")


def _check_choice(name: str, value: str, choices: Collection[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {sorted(choices)}")


class AutoencoderLoss(nn.Module):
    """Perceptual-compression loss of the first stage.

    Generator objective (``x``, ``x_hat`` in ``[-1, 1]``, ``[B, C, H, W]``)::

        nll   = mean(rec_weight * r(x, x_hat) + perceptual_weight * LPIPS(x, x_hat))
        g     = -mean(D(x_hat))
        total = nll + lambda * disc_factor * g + reg

    with ``r`` the per-pixel L1 or squared error and ``lambda`` the adaptive weight
    (VQGAN eq. 7). The regulariser ``reg`` is ``codebook_weight * L_vq`` (VQ-VAE eq. 3,
    from :class:`~ldm_lightning.nn.quantizer.VectorQuantizer`) or
    ``kl_weight * KL / (C*H*W)`` with ``KL`` the batch mean of the per-sample KL sum
    (``DiagonalGaussian.kl().mean()``). CompVis sums the reconstruction over pixels and so
    weighs the KL against a per-sample sum; dividing by ``C*H*W`` keeps ``kl_weight`` on that
    scale (1e-6 in the LDM configs) while ``nll`` here is a per-element mean. CompVis' KL
    loss also learns a scalar output log-variance; it starts at 0 and barely moves, so this
    loss keeps the fixed-variance form (``nll`` as above).

    Args:
        regularizer: ``"vq"`` or ``"kl"``.
        rec_loss: ``"l1"`` or ``"l2"``.
        rec_weight: weight of the pixel reconstruction term.
        perceptual_weight: weight of LPIPS; 0 disables it.
        perceptual: LPIPS-like ``f(x, x_hat) -> [B, 1, 1, 1]`` (e.g. from
            :func:`~ldm_lightning.losses.perceptual.build_lpips`); required when
            ``perceptual_weight > 0``. Stored as ``perceptual_loss`` (the CompVis name).
        codebook_weight: weight of the VQ loss.
        kl_weight: weight of the KL term (on the per-sample-sum scale, see above).
        disc_start: global step from which the GAN terms are on; before it the discriminator
            is not run by :meth:`generator_loss` and :meth:`discriminator_loss` returns 0.
        disc_weight: factor on the adaptive weight (0.75 in taming's VQGAN configs).
        disc_factor: factor on the GAN terms once active.
        disc_loss: ``"hinge"`` or ``"vanilla"`` (non-saturating, softplus).
        disc_in_channels, disc_ndf, disc_num_layers: PatchGAN size.
        adaptive_weight_max: upper clamp of the adaptive weight.
    """

    def __init__(
        self,
        *,
        regularizer: str = "vq",
        rec_loss: str = "l1",
        rec_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        perceptual: nn.Module | Perceptual | None = None,
        codebook_weight: float = 1.0,
        kl_weight: float = 1e-6,
        disc_start: int = 0,
        disc_weight: float = 0.75,
        disc_factor: float = 1.0,
        disc_loss: str = "hinge",
        disc_in_channels: int = 3,
        disc_ndf: int = 64,
        disc_num_layers: int = 3,
        adaptive_weight_max: float = 1e4,
    ) -> None:
        super().__init__()
        _check_choice("regularizer", regularizer, _REGULARIZERS)
        _check_choice("rec_loss", rec_loss, _REC_LOSSES)
        _check_choice("disc_loss", disc_loss, _DISC_LOSSES)
        if perceptual_weight > 0 and perceptual is None:
            raise ValueError(
                "perceptual_weight > 0 needs a perceptual network: pass "
                "perceptual=build_lpips(...) (ldm_lightning.losses.perceptual) or set "
                "perceptual_weight=0"
            )
        self.regularizer = regularizer
        self.rec_loss = rec_loss
        self.rec_weight = rec_weight
        self.perceptual_weight = perceptual_weight
        self.perceptual_loss = perceptual if perceptual_weight > 0 else None
        self.codebook_weight = codebook_weight
        self.kl_weight = kl_weight
        self.disc_start = disc_start
        self.disc_weight = disc_weight
        self.disc_factor = disc_factor
        self.disc_loss = disc_loss
        self.adaptive_weight_max = adaptive_weight_max
        self.discriminator = NLayerDiscriminator(disc_in_channels, disc_ndf, disc_num_layers)

    def train(self, mode: bool = True) -> "AutoencoderLoss":
        """Switch modes, keeping the perceptual network in eval: LPIPS' linear heads contain
        dropout, and a frozen metric must give the same value in training and validation."""
        super().train(mode)
        if isinstance(self.perceptual_loss, nn.Module):
            self.perceptual_loss.eval()
        return self

    def gan_factor(self, global_step: int) -> float:
        """``disc_factor`` once ``global_step >= disc_start``, else 0 (taming's adopt_weight)."""
        return self.disc_factor if global_step >= self.disc_start else 0.0

    def generator_loss(
        self,
        x: Tensor,
        x_hat: Tensor,
        reg_loss: Tensor,
        global_step: int,
        last_layer: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Autoencoder objective (see the class docstring).

        Args:
            x: inputs [B, C, H, W] in [-1, 1].
            x_hat: reconstructions [B, C, H, W].
            reg_loss: scalar VQ loss or batch-mean KL.
            global_step: optimiser step, for ``disc_start``.
            last_layer: decoder's last weight (``Decoder.last_layer``) for the adaptive weight.

        Returns:
            Scalar loss and detached logs ``total, rec, perceptual, nll, g_loss, d_weight,
            disc_factor, reg``.
        """
        rec = _REC_LOSSES[self.rec_loss](x, x_hat)  # [B, C, H, W]
        if self.perceptual_loss is not None:
            perceptual = self.perceptual_loss(x.contiguous(), x_hat.contiguous())  # [B, 1, 1, 1]
        else:
            perceptual = torch.zeros((), device=x.device, dtype=rec.dtype)
        nll = (self.rec_weight * rec + self.perceptual_weight * perceptual).mean()

        factor = self.gan_factor(global_step)
        if factor > 0:
            g_loss = -self.discriminator(x_hat.contiguous()).mean()
            d_weight = self._adaptive_weight(nll, g_loss, last_layer)
        else:
            g_loss = torch.zeros((), device=x.device, dtype=nll.dtype)
            d_weight = torch.zeros((), device=x.device, dtype=nll.dtype)

        if self.regularizer == "vq":
            reg = self.codebook_weight * reg_loss
        else:
            reg = self.kl_weight * reg_loss / x[0].numel()
        total = nll + d_weight * factor * g_loss + reg
        logs = {
            "total": total,
            "rec": rec.mean(),
            "perceptual": perceptual.mean(),
            "nll": nll,
            "g_loss": g_loss,
            "d_weight": d_weight,
            "disc_factor": total.new_full((), factor),  # made on the device, not copied to it
            "reg": reg_loss,
        }
        return total, {k: v.detach() for k, v in logs.items()}

    def discriminator_loss(
        self, x: Tensor, x_hat: Tensor, global_step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """PatchGAN objective, times :meth:`gan_factor` (0 before ``disc_start``).

        hinge:   ``0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))``
        vanilla: ``0.5 * (mean softplus(-D(x)) + mean softplus(D(x_hat)))``

        ``x_hat`` is detached here, so this loss never reaches the autoencoder.

        Returns:
            Scalar loss and detached logs ``disc_loss, logits_real, logits_fake`` (mean logits).
        """
        logits_real = self.discriminator(x.contiguous().detach())
        logits_fake = self.discriminator(x_hat.contiguous().detach())
        loss = self.gan_factor(global_step) * _DISC_LOSSES[self.disc_loss](logits_real, logits_fake)
        logs = {
            "disc_loss": loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        return loss, logs

    def _adaptive_weight(self, nll: Tensor, g_loss: Tensor, last_layer: Tensor | None) -> Tensor:
        """``lambda = ||grad_L nll|| / (||grad_L g|| + 1e-4)`` (VQGAN eq. 7), clamped, times
        ``disc_weight``; ``L`` is the decoder's last layer. Detached: it is a weight, not a
        term to optimise."""
        if last_layer is None or not (nll.requires_grad and g_loss.requires_grad):
            # Without a graph (validation under no_grad) the gradients do not exist; taming
            # falls back to 0 in that case as well, so the GAN term is then only logged.
            return torch.zeros((), device=nll.device, dtype=nll.dtype)
        nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
        return weight.clamp(0.0, self.adaptive_weight_max).detach() * self.disc_weight
